//! Which provider and slot a mask should try next.
//!
//! Safety does not live here: a slot is taken by creating its reservation object, which the API
//! server creates at most once. This module only orders the attempts so load spreads across
//! accounts (most free slots first, ties broken by namespace and name) and says why a mask waits.

use std::collections::BTreeSet;

/// What the allocator needs to know of one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSlots {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub max_slots: u32,
    pub tags: Vec<String>,
    /// Namespaces allowed to use it; empty means all.
    pub namespaces: Vec<String>,
    /// Verified and not being deleted (the phase check is the caller's).
    pub usable: bool,
    /// Slot indices reserved now, as far as the caller's cache knows.
    pub taken: BTreeSet<u32>,
}

impl ProviderSlots {
    /// Free slot indices, lowest first.
    ///
    /// After `maxSlots` shrinks below slots still held, those holders keep their slots and no
    /// slot is offered until every slot at or above the new maximum is released. Offering a low
    /// index while a high one is held would let holders exceed the new maximum, since only equal
    /// indices collide when reservations are created.
    pub fn free(&self) -> impl Iterator<Item = u32> + '_ {
        let shrunk = self.taken.range(self.max_slots..).next().is_some();
        (0..self.max_slots).filter(move |slot| !shrunk && !self.taken.contains(slot))
    }

    /// Slots held at or above `max_slots` (after a shrink).
    pub fn over_limit(&self) -> usize {
        self.taken.range(self.max_slots..).count()
    }

    fn free_count(&self) -> usize {
        self.free().count()
    }
}

/// What a mask asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskRequest<'a> {
    pub namespace: &'a str,
    /// Provider tags accepted; empty means any.
    pub tags: &'a [String],
    /// Only this provider (by uid), whatever its tags and phase: a provider's own verification.
    pub pinned_uid: Option<&'a str>,
    /// The mask's uid: breaks ties and picks where among the free slots this mask starts, so
    /// masks allocating at the same moment spread over providers and slots instead of all
    /// racing for the same one. Deterministic for a given mask.
    pub uid: &'a str,
    /// Providers (by name) never taken, whatever their tags.
    pub avoid: &'a [String],
}

/// The allocator's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan<'a> {
    /// Try these (provider, slot) pairs in order; the first reservation created wins.
    Try(Vec<(&'a ProviderSlots, u32)>),
    /// Providers match but every slot is taken.
    Waiting { matching: usize },
    /// No provider matches the mask's namespace and tags.
    NoProviders,
}

/// Whether `provider` may serve `mask` at all.
pub fn matches(provider: &ProviderSlots, mask: &MaskRequest<'_>) -> bool {
    if let Some(uid) = mask.pinned_uid {
        return provider.uid == uid;
    }
    provider.usable
        && !mask.avoid.contains(&provider.name)
        && (provider.namespaces.is_empty()
            || provider.namespaces.iter().any(|ns| ns == mask.namespace))
        && (mask.tags.is_empty() || mask.tags.iter().any(|t| provider.tags.contains(t)))
}

/// Orders every free slot of every matching provider: providers with more free slots first,
/// ties broken by a hash of (mask uid, provider uid); within a provider, free slots in order
/// starting from a position derived from the mask uid.
pub fn plan<'a>(providers: &'a [ProviderSlots], mask: &MaskRequest<'_>) -> Plan<'a> {
    let mut matching: Vec<&ProviderSlots> = providers.iter().filter(|p| matches(p, mask)).collect();
    if matching.is_empty() {
        return Plan::NoProviders;
    }
    matching.sort_by_cached_key(|p| {
        (
            std::cmp::Reverse(p.free_count()),
            fnv1a(&[mask.uid.as_bytes(), p.uid.as_bytes()]),
            p.namespace.clone(),
            p.name.clone(),
        )
    });
    let start = fnv1a(&[mask.uid.as_bytes()]);
    let attempts: Vec<_> = matching
        .iter()
        .flat_map(|p| {
            let free: Vec<u32> = p.free().collect();
            let offset = if free.is_empty() {
                0
            } else {
                usize::try_from(start % free.len() as u64).unwrap_or(0)
            };
            free.into_iter()
                .cycle()
                .skip(offset)
                .take(p.free_count())
                .map(move |slot| (*p, slot))
                .collect::<Vec<_>>()
        })
        .collect();
    if attempts.is_empty() {
        Plan::Waiting {
            matching: matching.len(),
        }
    } else {
        Plan::Try(attempts)
    }
}

/// FNV-1a over several byte strings (separated), stable across builds and platforms.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    parts.iter().fold(0xcbf2_9ce4_8422_2325, |h, part| {
        part.iter()
            .chain(&[0xff])
            .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, max: u32, taken: &[u32], tags: &[&str]) -> ProviderSlots {
        ProviderSlots {
            namespace: "vpn".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            max_slots: max,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            namespaces: vec![],
            usable: true,
            taken: taken.iter().copied().collect(),
        }
    }

    fn any(ns: &str) -> MaskRequest<'_> {
        MaskRequest {
            namespace: ns,
            tags: &[],
            pinned_uid: None,
            uid: "u",
            avoid: &[],
        }
    }

    fn first(plan: &Plan<'_>) -> (String, u32) {
        match plan {
            Plan::Try(attempts) => (attempts[0].0.name.clone(), attempts[0].1),
            other => panic!("expected attempts, got {other:?}"),
        }
    }

    #[test]
    fn the_provider_with_most_free_slots_is_tried_first() {
        let providers = [
            provider("a", 4, &[0, 1, 2], &[]),
            provider("b", 3, &[0], &[]),
        ];
        assert_eq!(first(&plan(&providers, &any("x"))).0, "b");
    }

    #[test]
    fn every_free_slot_is_tried_once() {
        let providers = [provider("a", 4, &[1], &[]), provider("b", 3, &[], &[])];
        let Plan::Try(attempts) = plan(&providers, &any("x")) else {
            panic!("expected attempts")
        };
        let mut seen: Vec<(String, u32)> =
            attempts.iter().map(|(p, s)| (p.name.clone(), *s)).collect();
        seen.sort();
        let want = [("a", 0), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 2)];
        assert_eq!(seen, want.map(|(p, s)| (p.to_owned(), s)));
    }

    #[test]
    fn ties_are_deterministic_per_mask_and_spread_across_masks() {
        let providers: Vec<_> = (0..10)
            .map(|i| provider(&format!("p{i}"), 20, &[], &[]))
            .collect();
        let uids: Vec<String> = (0..50).map(|i| format!("uid-{i}")).collect();
        let firsts: std::collections::BTreeSet<(String, u32)> = uids
            .iter()
            .map(|uid| {
                let request = MaskRequest {
                    namespace: "x",
                    tags: &[],
                    pinned_uid: None,
                    uid,
                    avoid: &[],
                };
                let choice = first(&plan(&providers, &request));
                assert_eq!(
                    first(&plan(&providers, &request)),
                    choice,
                    "same mask, same plan"
                );
                choice
            })
            .collect();
        // 50 masks allocating at once start on many different slots, not all on one. Uniform
        // picks of 50 among 200 slots give ~44 distinct on average (birthday collisions); a
        // shared order would give 1.
        assert!(
            firsts.len() >= 25,
            "only {} distinct first choices",
            firsts.len()
        );
    }

    #[test]
    fn exhausted_providers_leave_the_mask_waiting() {
        let providers = [provider("a", 1, &[0], &[]), provider("b", 2, &[0, 1], &[])];
        assert_eq!(plan(&providers, &any("x")), Plan::Waiting { matching: 2 });
    }

    #[test]
    fn an_avoided_provider_is_never_offered_whatever_its_free_slots() {
        let providers = [provider("a", 9, &[], &[]), provider("b", 1, &[], &[])];
        let avoid = ["a".to_owned()];
        let request = MaskRequest {
            avoid: &avoid,
            ..any("x")
        };
        let Plan::Try(attempts) = plan(&providers, &request) else {
            panic!("b is free")
        };
        assert!(attempts.iter().all(|(p, _)| p.name == "b"), "{attempts:?}");
        let both = ["a".to_owned(), "b".to_owned()];
        let request = MaskRequest {
            avoid: &both,
            ..any("x")
        };
        assert_eq!(plan(&providers, &request), Plan::NoProviders);
    }

    #[test]
    fn tags_namespaces_and_usability_filter_providers() {
        let mut restricted = provider("r", 5, &[], &["eu"]);
        restricted.namespaces = vec!["media".into()];
        let mut unverified = provider("u", 5, &[], &["eu"]);
        unverified.usable = false;
        let providers = [restricted, unverified, provider("us", 5, &[], &["us"])];
        let eu = ["eu".to_owned()];
        assert_eq!(
            first(&plan(
                &providers,
                &MaskRequest {
                    namespace: "media",
                    tags: &eu,
                    pinned_uid: None,
                    uid: "u",
                    avoid: &[],
                }
            ))
            .0,
            "r"
        );
        assert_eq!(
            plan(
                &providers,
                &MaskRequest {
                    namespace: "other",
                    tags: &eu,
                    pinned_uid: None,
                    uid: "u",
                    avoid: &[],
                }
            ),
            Plan::NoProviders
        );
    }

    #[test]
    fn verification_is_pinned_to_its_provider_even_before_it_is_usable() {
        let mut p = provider("p", 1, &[], &[]);
        p.usable = false;
        let providers = [provider("other", 9, &[], &[]), p];
        let request = MaskRequest {
            namespace: "vpn",
            tags: &[],
            pinned_uid: Some("uid-p"),
            uid: "u",
            avoid: &[],
        };
        assert_eq!(first(&plan(&providers, &request)), ("p".into(), 0));
    }

    #[test]
    fn slots_above_a_shrunk_maximum_are_never_offered() {
        // maxSlots went from 4 to 2 while slots 2 and 3 are held: nothing is offered until both
        // are released, although slots 0 and 1 are unused.
        let shrunk = provider("a", 2, &[3], &[]);
        assert_eq!(shrunk.free().count(), 0);
        assert_eq!(shrunk.over_limit(), 1);
        let released = provider("a", 2, &[1], &[]);
        assert_eq!(released.free().collect::<Vec<_>>(), [0]);
        assert_eq!(
            plan(&[provider("a", 2, &[2, 3], &[])], &any("x")),
            Plan::Waiting { matching: 1 }
        );
    }
}
