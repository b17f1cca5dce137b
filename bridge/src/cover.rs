//! The broker-side cover: which filters the bridge itself subscribes to at the
//! broker so that every filter a web client holds is served, and no topic is
//! matched by two of them.
//!
//! Why: an MQTT broker sends one copy of a message per matching subscription.
//! If the bridge subscribed once per client filter, `fleet/#` and `fleet/d1/t`
//! would bring two copies of every `fleet/d1/t` message, and no local trick can
//! tell a second copy from a second message. With pairwise disjoint broker
//! subscriptions every message arrives once; the hub then matches it locally
//! and hands each connection one copy.
//!
//! Overlapping filters are merged into their least general generalization
//! ([`channel::generalize`]): `fleet/+/t` and `+/d1/t` become `+/+/t`. Topics
//! that no client wants may then arrive and are discarded by the local match.
//! An element is released only when no client filter under it is left, so an
//! element is never narrowed while in use (narrowing would need a second,
//! overlapping subscription for a moment).
//!
//! The elements live in a tree of their levels, so finding the element that
//! covers a filter, or the elements a filter overlaps, costs a walk of the
//! filter's levels rather than a scan of every element: ten thousand distinct
//! device channels stay cheap.
//!
//! Pure data: the MQTT link ([`crate::server::mqtt`]) applies the changes.

use std::collections::{BTreeSet, HashMap};

use crate::channel;

/// What to change at the broker.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CoverChange {
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
}

impl CoverChange {
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

/// The member that keeps a pinned element: no client filter can equal it
/// (U+0000 is never valid in a channel).
const PINNED: &str = "\u{0}pinned";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Node {
    children: HashMap<String, Node>,
    /// Set when an element ends here: the client filters it serves.
    members: Option<BTreeSet<String>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.members.is_none() && self.children.is_empty()
    }
}

fn starts_reserved(levels: &[&str], first: bool) -> bool {
    first && levels.first().is_some_and(|l| l.starts_with('$'))
}

fn join(path: &[&str]) -> String {
    path.join("/")
}

/// The element covering `f` below `node` (elements are disjoint: at most one).
fn covering<'a>(
    node: &'a Node,
    f: &[&'a str],
    first: bool,
    path: &mut Vec<&'a str>,
) -> Option<String> {
    // A first-level wildcard element never matches `$` topics.
    if !starts_reserved(f, first) && node.children.get("#").is_some_and(|h| h.members.is_some()) {
        path.push("#");
        let found = join(path);
        path.pop();
        return Some(found);
    }
    let (level, rest) = match f.split_first() {
        None => return node.members.as_ref().map(|_| join(path)),
        Some(split) => split,
    };
    if *level == "#" {
        return None; // only an element `#` here covers a `#`
    }
    let mut candidates = vec![*level];
    if *level != "+" && !(first && level.starts_with('$')) {
        candidates.push("+");
    }
    for c in candidates {
        if let Some(child) = node.children.get(c) {
            path.push(c);
            let found = covering(child, rest, false, path);
            path.pop();
            if found.is_some() {
                return found;
            }
        }
    }
    None
}

/// Every element below `node` (with `skip_reserved`, not those whose first
/// level is a `$` name).
fn collect_all(
    node: &Node,
    skip_reserved: bool,
    path: &mut Vec<String>,
    out: &mut BTreeSet<String>,
) {
    if node.members.is_some() {
        out.insert(path.join("/"));
    }
    for (k, child) in &node.children {
        if skip_reserved && k.starts_with('$') {
            continue;
        }
        path.push(k.clone());
        collect_all(child, false, path, out);
        path.pop();
    }
}

/// Every element below `node` that some topic matches together with `f`.
fn overlapping(
    node: &Node,
    f: &[&str],
    first: bool,
    path: &mut Vec<String>,
    out: &mut BTreeSet<String>,
) {
    let reserved = starts_reserved(f, first);
    if !reserved && node.children.get("#").is_some_and(|h| h.members.is_some()) {
        path.push("#".into());
        out.insert(path.join("/"));
        path.pop();
    }
    let Some((level, rest)) = f.split_first() else {
        if node.members.is_some() {
            out.insert(path.join("/"));
        }
        return;
    };
    match *level {
        "#" => collect_all(node, first, path, out),
        "+" => {
            for (k, child) in &node.children {
                if k == "#" || (first && k.starts_with('$')) {
                    continue;
                }
                path.push(k.clone());
                overlapping(child, rest, false, path, out);
                path.pop();
            }
        }
        literal => {
            let mut candidates = vec![literal];
            if !(first && literal.starts_with('$')) {
                candidates.push("+");
            }
            for c in candidates {
                if let Some(child) = node.children.get(c) {
                    path.push(c.to_string());
                    overlapping(child, rest, false, path, out);
                    path.pop();
                }
            }
        }
    }
}

/// A set of pairwise disjoint broker filters ("elements"), each with the
/// client filters ("members") it serves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cover {
    root: Node,
    len: usize,
}

/// New elements for a round of client filters, and which filters each serves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Filters an element already covers: nothing to ask the broker.
    pub covered: Vec<String>,
    /// Elements to subscribe, each with the filters it is for.
    pub new: Vec<(String, Vec<String>)>,
}

impl Cover {
    pub fn new() -> Self {
        Self::default()
    }

    /// The broker filters, in order.
    pub fn elements(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        collect_all(&self.root, false, &mut Vec::new(), &mut out);
        out.into_iter().collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, element: &str) -> bool {
        self.node(element).is_some_and(|n| n.members.is_some())
    }

    fn node(&self, element: &str) -> Option<&Node> {
        element
            .split('/')
            .try_fold(&self.root, |n, l| n.children.get(l))
    }

    fn node_mut(&mut self, element: &str) -> &mut Node {
        element.split('/').fold(&mut self.root, |n, l| {
            n.children.entry(l.to_string()).or_default()
        })
    }

    /// The element that serves `filter`, if one covers it.
    pub fn element_for(&self, filter: &str) -> Option<String> {
        let levels: Vec<&str> = filter.split('/').collect();
        covering(&self.root, &levels, true, &mut Vec::new())
    }

    /// The elements that overlap `filter`.
    pub fn overlapping(&self, filter: &str) -> Vec<String> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = BTreeSet::new();
        overlapping(&self.root, &levels, true, &mut Vec::new(), &mut out);
        out.into_iter().collect()
    }

    /// Whether `filter` is a member (a client filter being served).
    pub fn is_member(&self, filter: &str) -> bool {
        self.element_for(filter)
            .and_then(|e| {
                self.node(&e)
                    .and_then(|n| n.members.as_ref().map(|m| m.contains(filter)))
            })
            .unwrap_or(false)
    }

    fn take(&mut self, element: &str) -> BTreeSet<String> {
        let levels: Vec<&str> = element.split('/').collect();
        fn go(node: &mut Node, levels: &[&str]) -> Option<BTreeSet<String>> {
            match levels.split_first() {
                None => node.members.take(),
                Some((l, rest)) => {
                    let child = node.children.get_mut(*l)?;
                    let got = go(child, rest);
                    if child.is_empty() {
                        node.children.remove(*l);
                    }
                    got
                }
            }
        }
        let taken = go(&mut self.root, &levels);
        if taken.is_some() {
            self.len -= 1;
        }
        taken.unwrap_or_default()
    }

    /// Works out the elements a round of client filters needs, without
    /// changing the cover: filters already covered, and new elements (each
    /// merged with what it overlaps, in the cover and in the round).
    pub fn plan<'a>(&self, filters: impl IntoIterator<Item = &'a str>) -> Plan {
        let mut plan = Plan::default();
        for f in filters {
            if self.element_for(f).is_some() {
                plan.covered.push(f.to_string());
                continue;
            }
            if let Some((_, members)) = plan.new.iter_mut().find(|(e, _)| channel::covers(e, f)) {
                members.push(f.to_string());
                continue;
            }
            let mut element = f.to_string();
            let mut members = vec![f.to_string()];
            loop {
                let mut grown = false;
                for other in self.overlapping(&element) {
                    if !channel::covers(&element, &other) {
                        element = channel::generalize(&element, &other);
                        grown = true;
                    }
                }
                while let Some(i) = plan
                    .new
                    .iter()
                    .position(|(e, _)| channel::overlaps(e, &element))
                {
                    let (other, their) = plan.new.swap_remove(i);
                    element = channel::generalize(&element, &other);
                    members.extend(their);
                    grown = true;
                }
                if !grown {
                    break;
                }
            }
            plan.new.push((element, members));
        }
        plan
    }

    /// Adds a client filter. Returns what the broker must be told: nothing
    /// when an element already covers it, otherwise one new element to
    /// subscribe and the elements it replaces (to unsubscribe once the new
    /// one is active).
    pub fn add(&mut self, filter: &str) -> CoverChange {
        if let Some(element) = self.element_for(filter) {
            if let Some(m) = self.node_mut(&element).members.as_mut() {
                m.insert(filter.to_string());
            }
            return CoverChange::default();
        }
        let plan = self.plan([filter]);
        let mut change = CoverChange::default();
        for (element, members) in plan.new {
            change.unsubscribe.extend(self.install(&element, members));
            change.subscribe.push(element);
        }
        change
    }

    /// Installs `element` (subscribed at the broker meanwhile) with `members`,
    /// absorbing the elements it overlaps, which it covers. Returns those
    /// elements, to unsubscribe.
    pub fn install(
        &mut self,
        element: &str,
        members: impl IntoIterator<Item = String>,
    ) -> Vec<String> {
        let replaced: Vec<String> = self
            .overlapping(element)
            .into_iter()
            .filter(|e| e != element)
            .collect();
        let mut all: BTreeSet<String> = members.into_iter().collect();
        all.extend(self.take(element));
        for r in &replaced {
            debug_assert!(channel::covers(element, r), "{element} must cover {r}");
            all.extend(self.take(r));
        }
        self.node_mut(element).members = Some(all);
        self.len += 1;
        replaced
    }

    /// Pins `element`: it is served from now on and never released (the
    /// embedded broker: the bridge subscribes to `#` once and matches every
    /// client filter itself). Returns what it replaces, to unsubscribe.
    pub fn pin(&mut self, element: &str) -> Vec<String> {
        self.install(element, [PINNED.to_string()])
    }

    /// Removes a client filter (the last connection holding it has let go).
    /// Returns the element to unsubscribe when nothing under it is left.
    pub fn remove(&mut self, filter: &str) -> CoverChange {
        let Some(element) = self.element_for(filter) else {
            return CoverChange::default();
        };
        let node = self.node_mut(&element);
        let Some(members) = node.members.as_mut() else {
            return CoverChange::default();
        };
        members.remove(filter);
        if !members.is_empty() {
            return CoverChange::default();
        }
        self.take(&element);
        CoverChange {
            subscribe: Vec::new(),
            unsubscribe: vec![element],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disjoint(c: &Cover) -> bool {
        let e = c.elements();
        e.iter()
            .enumerate()
            .all(|(i, a)| e[i + 1..].iter().all(|b| !channel::overlaps(a, b)))
    }

    #[test]
    fn a_pinned_element_serves_everything_and_stays() {
        let mut c = Cover::new();
        assert!(c.pin("#").is_empty());
        assert!(c.add("fleet/#").is_empty(), "served by the pinned #");
        assert!(c.add("#").is_empty());
        assert!(
            c.remove("#").is_empty(),
            "a client letting go of # keeps the pin"
        );
        assert!(c.remove("fleet/#").is_empty());
        assert_eq!(c.elements(), vec!["#"]);
        // `$` topics are outside `#`: they get elements of their own.
        assert_eq!(c.add("$SYS/x").subscribe, vec!["$SYS/x"]);
    }

    #[test]
    fn covered_filter_changes_nothing() {
        let mut c = Cover::new();
        assert_eq!(c.add("fleet/#").subscribe, vec!["fleet/#"]);
        assert!(c.add("fleet/d1/t").is_empty());
        assert_eq!(c.element_for("fleet/d1/t").as_deref(), Some("fleet/#"));
        assert!(c.remove("fleet/#").is_empty(), "fleet/d1/t still needs it");
        assert_eq!(c.remove("fleet/d1/t").unsubscribe, vec!["fleet/#"]);
        assert!(c.is_empty());
        assert_eq!(c.root, Node::default(), "empty branches are pruned");
    }

    #[test]
    fn overlapping_filters_merge() {
        let mut c = Cover::new();
        c.add("fleet/+/t");
        let change = c.add("+/d1/t");
        assert_eq!(change.subscribe, vec!["+/+/t"]);
        assert_eq!(change.unsubscribe, vec!["fleet/+/t"]);
        assert!(disjoint(&c));
        c.add("x/y");
        assert_eq!(c.len(), 2);
        assert!(c.remove("fleet/+/t").is_empty());
        assert_eq!(c.remove("+/d1/t").unsubscribe, vec!["+/+/t"]);
    }

    #[test]
    fn chain_merge() {
        let mut c = Cover::new();
        c.add("a/1/x");
        c.add("b/1/y");
        let change = c.add("+/1/x/#");
        // Overlaps a/1/x: generalized to +/1/x/#, which is disjoint from b/1/y.
        assert_eq!(change.subscribe, vec!["+/1/x/#"]);
        assert_eq!(change.unsubscribe, vec!["a/1/x"]);
        assert!(disjoint(&c));
    }

    #[test]
    fn install_absorbs_overlapping() {
        let mut c = Cover::new();
        c.add("fleet/+/t");
        c.add("other");
        let replaced = c.install("+/+/t", ["+/d1/t".to_string()]);
        assert_eq!(replaced, vec!["fleet/+/t"]);
        assert_eq!(c.element_for("fleet/+/t").as_deref(), Some("+/+/t"));
        assert!(c.is_member("+/d1/t") && c.is_member("fleet/+/t"));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn plan_merges_within_a_round() {
        let mut c = Cover::new();
        c.add("a/b");
        let plan = c.plan(["a/b", "x/1", "x/+", "y"]);
        assert_eq!(plan.covered, vec!["a/b"]);
        let mut new = plan.new.clone();
        new.iter_mut().for_each(|(_, m)| m.sort());
        new.sort();
        assert_eq!(
            new,
            vec![
                (
                    "x/+".to_string(),
                    vec!["x/+".to_string(), "x/1".to_string()]
                ),
                ("y".into(), vec!["y".into()])
            ]
        );
        assert_eq!(c.len(), 1, "planning changes nothing");
    }

    #[test]
    fn reserved_topics_stay_apart() {
        let mut c = Cover::new();
        c.add("#");
        assert_eq!(c.add("$SYS/x").subscribe, vec!["$SYS/x"]);
        assert!(c.element_for("$SYS/x").is_some_and(|e| e == "$SYS/x"));
        assert!(c.overlapping("+/x").iter().all(|e| e == "#"));
        assert!(disjoint(&c));
    }

    #[test]
    fn many_distinct_filters_are_cheap() {
        let mut c = Cover::new();
        for i in 0..20_000 {
            assert_eq!(
                c.add(&format!("fleet/dev-{i}/telemetry")).subscribe.len(),
                1
            );
        }
        assert_eq!(c.len(), 20_000);
        assert_eq!(
            c.overlapping("fleet/dev-7/+"),
            vec!["fleet/dev-7/telemetry"]
        );
    }
}
