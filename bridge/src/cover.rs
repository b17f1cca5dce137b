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
//! Pure data: the MQTT link ([`crate::server::mqtt`]) applies the changes.

use std::collections::{BTreeMap, BTreeSet};

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

/// A set of pairwise disjoint broker filters, each with the client filters
/// ("members") it serves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cover {
    elements: BTreeMap<String, BTreeSet<String>>,
}

impl Cover {
    pub fn new() -> Self {
        Self::default()
    }

    /// The broker filters, in order.
    pub fn elements(&self) -> impl Iterator<Item = &str> {
        self.elements.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.elements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// The element that serves `filter`, if any element covers it.
    pub fn element_for(&self, filter: &str) -> Option<&str> {
        self.elements
            .keys()
            .find(|e| channel::covers(e, filter))
            .map(String::as_str)
    }

    /// Whether `filter` is a member (a client filter being served).
    pub fn is_member(&self, filter: &str) -> bool {
        self.elements.values().any(|m| m.contains(filter))
    }

    /// Adds a client filter. Returns what the broker must be told: nothing
    /// when an element already covers it, otherwise one new element to
    /// subscribe and the elements it replaces (to unsubscribe once the new
    /// one is active).
    pub fn add(&mut self, filter: &str) -> CoverChange {
        if let Some(members) = self
            .elements
            .iter_mut()
            .find(|(e, _)| channel::covers(e, filter))
            .map(|(_, m)| m)
        {
            members.insert(filter.to_string());
            return CoverChange::default();
        }
        let mut element = filter.to_string();
        let mut members = BTreeSet::from([filter.to_string()]);
        let mut replaced = Vec::new();
        // Merging can make the element overlap further elements: repeat until
        // it is disjoint from all that remain.
        while let Some(other) = self
            .elements
            .keys()
            .find(|e| channel::overlaps(e, &element))
            .cloned()
        {
            element = channel::generalize(&element, &other);
            members.extend(self.elements.remove(&other).unwrap_or_default());
            replaced.push(other);
        }
        self.elements.insert(element.clone(), members);
        CoverChange {
            subscribe: vec![element],
            unsubscribe: replaced,
        }
    }

    /// Removes a client filter (the last connection holding it has let go).
    /// Returns the element to unsubscribe when nothing under it is left.
    pub fn remove(&mut self, filter: &str) -> CoverChange {
        let Some(element) = self
            .elements
            .iter()
            .find(|(_, m)| m.contains(filter))
            .map(|(e, _)| e.clone())
        else {
            return CoverChange::default();
        };
        let members = self.elements.get_mut(&element).expect("element just found");
        members.remove(filter);
        if !members.is_empty() {
            return CoverChange::default();
        }
        self.elements.remove(&element);
        CoverChange {
            subscribe: Vec::new(),
            unsubscribe: vec![element],
        }
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
            .elements
            .keys()
            .filter(|e| channel::overlaps(e, element))
            .cloned()
            .collect();
        let mut all: BTreeSet<String> = members.into_iter().collect();
        for r in &replaced {
            debug_assert!(channel::covers(element, r), "{element} must cover {r}");
            all.extend(self.elements.remove(r).unwrap_or_default());
        }
        self.elements.insert(element.to_string(), all);
        replaced
    }

    /// The difference between two covers: what to subscribe to go from
    /// `self` to `next`, and what to unsubscribe afterwards.
    pub fn diff(&self, next: &Cover) -> CoverChange {
        CoverChange {
            subscribe: next
                .elements()
                .filter(|e| !self.elements.contains_key(*e))
                .map(str::to_string)
                .collect(),
            unsubscribe: self
                .elements()
                .filter(|e| !next.elements.contains_key(*e))
                .map(str::to_string)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disjoint(c: &Cover) -> bool {
        let e: Vec<&str> = c.elements().collect();
        e.iter()
            .enumerate()
            .all(|(i, a)| e[i + 1..].iter().all(|b| !channel::overlaps(a, b)))
    }

    #[test]
    fn covered_filter_changes_nothing() {
        let mut c = Cover::new();
        assert_eq!(c.add("fleet/#").subscribe, vec!["fleet/#"]);
        assert!(c.add("fleet/d1/t").is_empty());
        assert_eq!(c.element_for("fleet/d1/t"), Some("fleet/#"));
        assert!(c.remove("fleet/#").is_empty(), "fleet/d1/t still needs it");
        assert_eq!(c.remove("fleet/d1/t").unsubscribe, vec!["fleet/#"]);
        assert!(c.is_empty());
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
        assert_eq!(c.element_for("fleet/+/t"), Some("+/+/t"));
        assert!(c.is_member("+/d1/t") && c.is_member("fleet/+/t"));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn diff() {
        let mut a = Cover::new();
        a.add("x");
        let mut b = a.clone();
        b.add("y");
        assert_eq!(a.diff(&b).subscribe, vec!["y"]);
        assert!(a.diff(&b).unsubscribe.is_empty());
        assert_eq!(b.diff(&a).unsubscribe, vec!["y"]);
    }
}
