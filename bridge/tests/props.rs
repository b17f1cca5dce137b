//! Property tests: matching, covering, overlapping and the broker cover
//! against simple reference definitions over a small alphabet, where every
//! topic can be enumerated.

use std::collections::BTreeSet;

use bridge::channel::{covers, generalize, matches, overlaps, validate_filter, validate_topic};
use bridge::cover::Cover;
use proptest::prelude::*;

const LEVELS: [&str; 4] = ["a", "b", "$s", ""];
const MAX_DEPTH: usize = 4;

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("$s".to_string()),
        Just(String::new())
    ]
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..=MAX_DEPTH)
        .prop_map(|l| l.join("/"))
        .prop_filter("non-empty", |t| !t.is_empty())
}

/// Two filters made from one topic, so they always overlap.
fn overlapping_pair() -> impl Strategy<Value = (String, String)> {
    let mask = || {
        (
            prop::collection::vec(any::<bool>(), MAX_DEPTH),
            prop::option::of(0..MAX_DEPTH),
        )
    };
    (topic(), mask(), mask()).prop_map(|(t, ma, mb)| {
        let make = |(wild, cut): (Vec<bool>, Option<usize>)| {
            let mut levels: Vec<String> = t
                .split('/')
                .zip(wild)
                .map(|(l, w)| {
                    if w && !l.starts_with('$') {
                        "+".to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            // A `$` first level must stay literal to match the topic.
            let first = usize::from(t.starts_with('$'));
            if let Some(cut) = cut.map(|c| c.max(first)).filter(|c| *c < levels.len()) {
                levels.truncate(cut);
                levels.push("#".into());
            }
            levels.join("/")
        };
        (make(ma), make(mb))
    })
}

fn filter() -> impl Strategy<Value = String> {
    let lvl = prop_oneof![3 => level(), 2 => Just("+".to_string())];
    (prop::collection::vec(lvl, 1..=MAX_DEPTH), any::<bool>())
        .prop_map(|(mut l, hash)| {
            if hash {
                if l.len() == MAX_DEPTH {
                    l.pop();
                }
                l.push("#".into());
            }
            l.join("/")
        })
        .prop_filter("non-empty", |f| !f.is_empty())
}

/// Every topic of up to MAX_DEPTH + 1 levels over the alphabet.
fn all_topics() -> Vec<String> {
    let mut out = Vec::new();
    let mut frontier: Vec<Vec<&str>> = LEVELS.iter().map(|l| vec![*l]).collect();
    while let Some(t) = frontier.pop() {
        out.push(t.join("/"));
        if t.len() <= MAX_DEPTH {
            for l in LEVELS {
                let mut next = t.clone();
                next.push(l);
                frontier.push(next);
            }
        }
    }
    out
}

/// Matching by the letter of MQTT 3.1.1 §4.7, written independently.
fn reference_match(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
        return false;
    }
    fn go(f: &[&str], t: &[&str]) -> bool {
        match (f.first(), t.first()) {
            (Some(&"#"), _) => true,
            (None, None) => true,
            (Some(&"+"), Some(_)) => go(&f[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&f[1..], &t[1..]),
            _ => false,
        }
    }
    go(&f, &t)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_planned_round_installs_disjoint(
        before in prop::collection::vec(filter(), 0..10),
        round in prop::collection::vec(filter(), 1..10),
    ) {
        let mut cover = Cover::new();
        for f in &before {
            cover.add(f);
        }
        let plan = cover.plan(round.iter().map(String::as_str));
        for f in &plan.covered {
            prop_assert!(cover.element_for(f).is_some());
        }
        let new: Vec<&String> = plan.new.iter().map(|(e, _)| e).collect();
        for (i, a) in new.iter().enumerate() {
            for b in &new[i + 1..] {
                prop_assert!(!overlaps(a, b), "round elements {} and {} overlap", a, b);
            }
        }
        for (element, members) in plan.new {
            for m in &members {
                prop_assert!(covers(&element, m), "{} does not cover {}", element, m);
            }
            cover.install(&element, members);
        }
        let elements = cover.elements();
        for (i, a) in elements.iter().enumerate() {
            for b in &elements[i + 1..] {
                prop_assert!(!overlaps(a, b), "{} and {} overlap", a, b);
            }
        }
        for f in before.iter().chain(&round) {
            prop_assert!(cover.element_for(f).is_some(), "{} is not served", f);
        }
    }

    #[test]
    fn matching_agrees_with_the_reference(f in filter(), t in topic()) {
        prop_assert!(validate_filter(&f).is_ok());
        prop_assert!(validate_topic(&t).is_ok());
        prop_assert_eq!(matches(&f, &t), reference_match(&f, &t));
    }

    #[test]
    fn covers_is_inclusion_of_matched_topics(a in filter(), b in filter()) {
        let topics = all_topics();
        // Topics one level deeper than any filter decide every case.
        let included = topics.iter().all(|t| !matches(&b, t) || matches(&a, t));
        prop_assert_eq!(covers(&a, &b), included, "covers({}, {})", a, b);
    }

    #[test]
    fn overlaps_means_a_common_topic(a in filter(), b in filter()) {
        let common = all_topics().iter().any(|t| matches(&a, t) && matches(&b, t));
        prop_assert_eq!(overlaps(&a, &b), common, "{} / {}", a, b);
    }

    #[test]
    fn generalize_covers_both((a, b) in overlapping_pair()) {
        prop_assert!(overlaps(&a, &b), "{} / {}", a, b);
        let g = generalize(&a, &b);
        prop_assert!(validate_filter(&g).is_ok(), "{}", g);
        prop_assert!(covers(&g, &a) && covers(&g, &b), "{} does not cover {} and {}", g, a, b);
    }

    #[test]
    fn cover_stays_disjoint_and_serves_every_filter(
        ops in prop::collection::vec((filter(), any::<bool>()), 1..40)
    ) {
        let mut cover = Cover::new();
        let mut held: BTreeSet<String> = BTreeSet::new();
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        for (f, add) in ops {
            let change = if add {
                held.insert(f.clone());
                cover.add(&f)
            } else if held.remove(&f) {
                cover.remove(&f)
            } else {
                continue;
            };
            subscribed.extend(change.subscribe);
            for u in change.unsubscribe {
                subscribed.remove(&u);
            }
            let elements = cover.elements();
            prop_assert_eq!(elements.iter().cloned().collect::<BTreeSet<_>>(), subscribed.clone());
            prop_assert_eq!(cover.len(), elements.len());
            let elements: Vec<&str> = elements.iter().map(String::as_str).collect();
            for (i, x) in elements.iter().enumerate() {
                for y in &elements[i + 1..] {
                    prop_assert!(!overlaps(x, y), "{} and {} overlap", x, y);
                }
            }
            for h in &held {
                prop_assert!(cover.element_for(h).is_some(), "{} is not served", h);
            }
            // The tree lookups agree with a scan of every element.
            for probe in held.iter().chain(std::iter::once(&f)) {
                let scan_cover: Vec<String> = elements.iter().filter(|e| covers(e, probe)).map(|e| e.to_string()).collect();
                prop_assert_eq!(cover.element_for(probe), scan_cover.first().cloned(), "element_for({})", probe);
                let scan_overlap: Vec<String> = elements.iter().filter(|e| overlaps(e, probe)).map(|e| e.to_string()).collect();
                prop_assert_eq!(cover.overlapping(probe), scan_overlap, "overlapping({})", probe);
            }
            // No element is kept without a filter under it.
            for e in &elements {
                prop_assert!(held.iter().any(|h| covers(e, h)), "{} serves nothing", e);
            }
        }
    }
}
