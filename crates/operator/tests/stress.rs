//! Slot leasing under stress, against a real kube-apiserver: four operator instances acting at once
//! (no leader election, the worst case), dozens of masks created and deleted concurrently, and
//! providers deleted and recreated mid-run. A watcher sees every reservation the API server
//! stores and fails the test if any provider ever has more than `maxSlots`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_futures)] // test helpers

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

mod common;

use cloak_api::{MaskPhase, VpnMask, VpnMaskSpec, VpnProvider};
use cloak_testkit::{ControlPlane, TestNamespace};
use common::Running;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::watcher,
};
use serde_json::json;

const PROVIDERS: [(&str, u32); 3] = [("p1", 2), ("p2", 3), ("p3", 1)];
const MASKS: usize = 40;
/// Operator instances acting at once.
const RACERS: usize = 4;

/// What the watcher saw: the most reservations any provider (by uid) held at once.
#[derive(Default, Debug)]
struct Seen {
    held: BTreeMap<String, BTreeSet<String>>,
    max_of: BTreeMap<String, u32>,
    violations: Vec<String>,
    events: usize,
}

fn start_operator(instance: &str, client: Client) -> Running {
    let config = cloak_operator::Config {
        instance: instance.into(),
        ..cloak_operator::Config::default()
    };
    Running::start(client, config)
}

async fn provider(client: &Client, ns: &str, name: &str, max: u32) -> String {
    let object: VpnProvider = serde_json::from_value(json!({
        "apiVersion": "cloak.dev/v1alpha1", "kind": "VpnProvider", "metadata": {"name": name},
        "spec": {"secret": "creds", "maxSlots": max, "namespaces": [ns], "verify": {"skip": true}}
    }))
    .unwrap();
    let created = Api::<VpnProvider>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    created.uid().unwrap()
}

/// What the API server stores at one moment: live masks, reservations, live provider uids.
struct Snapshot {
    masks: Vec<VpnMask>,
    /// Reservation name → the uid of the mask it was made for.
    reservations: BTreeMap<String, String>,
    providers: BTreeSet<String>,
}

impl Snapshot {
    async fn read(client: &Client, ns: &str) -> Self {
        let masks = Api::<VpnMask>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .collect();
        let reservations = Api::<Lease>::namespaced(client.clone(), ns)
            .list_metadata(&ListParams::default().labels("app.kubernetes.io/managed-by=cloak"))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|l| {
                let mask = l.labels().get("cloak.dev/mask-uid").cloned();
                (l.name_any(), mask.unwrap_or_default())
            })
            .collect();
        let providers = Api::<VpnProvider>::namespaced(client.clone(), ns)
            .list_metadata(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.uid())
            .collect();
        Self {
            masks,
            reservations,
            providers,
        }
    }

    fn count(&self, phase: MaskPhase) -> usize {
        self.masks
            .iter()
            .filter(|m| m.status.as_ref().and_then(|s| s.phase) == Some(phase))
            .count()
    }

    /// The reservations the Ready masks name, as (reservation, mask uid), when all are of live
    /// providers and no two name the same one.
    fn assigned(&self) -> Option<BTreeMap<String, String>> {
        let mut assigned = BTreeMap::new();
        for mask in &self.masks {
            let status = mask.status.as_ref();
            if status.and_then(|s| s.phase) != Some(MaskPhase::Ready) {
                continue;
            }
            let held = status.and_then(|s| s.provider.as_ref())?;
            if !self.providers.contains(&held.uid) {
                return None;
            }
            let name = cloak_model::names::slot_lease(&held.name, held.slot);
            if assigned
                .insert(name, mask.uid().unwrap_or_default())
                .is_some()
            {
                return None; // two Ready masks name one reservation: not settled
            }
        }
        Some(assigned)
    }

    fn settled(&self, total: usize) -> bool {
        let (ready, waiting) = (self.count(MaskPhase::Ready), self.count(MaskPhase::Waiting));
        ready == total
            && ready + waiting == self.masks.len()
            && self.assigned().as_ref() == Some(&self.reservations)
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ready, waiting) = (self.count(MaskPhase::Ready), self.count(MaskPhase::Waiting));
        writeln!(
            f,
            "{ready} ready, {waiting} waiting of {} masks",
            self.masks.len()
        )?;
        writeln!(f, "live providers: {:?}", self.providers)?;
        writeln!(
            f,
            "stored reservations (name -> mask uid): {:#?}",
            self.reservations
        )?;
        for mask in &self.masks {
            let status = mask.status.clone().unwrap_or_default();
            if status.provider.is_some() || status.phase != Some(MaskPhase::Waiting) {
                writeln!(
                    f,
                    "mask {} uid {}: {:?} {:?} {:?}",
                    mask.name_any(),
                    mask.uid().unwrap_or_default(),
                    status.phase,
                    status.provider,
                    status.message
                )?;
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_never_exceed_max_slots_under_racing_operators_and_churn() {
    let cp = ControlPlane::shared();
    let client = cp.client();
    let ns = TestNamespace::create(&client, "stress").await.unwrap();
    let ns = ns.name().to_owned();
    common::credentials_secret(&client, &ns).await;

    // The watcher: every stored reservation, checked against its provider's maxSlots.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch_seen = seen.clone();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let watcher_task = tokio::spawn(async move {
        let mut events = watcher(
            leases,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=cloak"),
        )
        .boxed();
        while let Ok(Some(event)) = events.try_next().await {
            let mut seen = watch_seen.lock().unwrap();
            seen.events += 1;
            match event {
                watcher::Event::Apply(lease) | watcher::Event::InitApply(lease) => {
                    let uid = lease.labels()["cloak.dev/provider-uid"].clone();
                    seen.held
                        .entry(uid.clone())
                        .or_default()
                        .insert(lease.name_any());
                    let count = seen.held[&uid].len();
                    let max = seen.max_of.get(&uid).copied().unwrap_or(u32::MAX);
                    if count > max as usize {
                        let v = format!(
                            "provider {uid} held {count} > maxSlots {max}: {:?}",
                            seen.held[&uid]
                        );
                        seen.violations.push(v);
                    }
                }
                watcher::Event::Delete(lease) => {
                    let uid = lease.labels()["cloak.dev/provider-uid"].clone();
                    seen.held.entry(uid).or_default().remove(&lease.name_any());
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
        }
    });

    for (name, max) in PROVIDERS {
        let uid = provider(&client, &ns, name, max).await;
        seen.lock().unwrap().max_of.insert(uid, max);
    }
    // The operators act at once, each with its own client and caches.
    let racers: Vec<Running> = (0..RACERS)
        .map(|i| start_operator(&format!("racer-{i}"), cp.client()))
        .collect();

    let masks: Api<VpnMask> = Api::namespaced(client.clone(), &ns);
    let create = futures::stream::iter(0..MASKS)
        .map(|i| {
            let masks = masks.clone();
            async move {
                masks
                    .create(
                        &PostParams::default(),
                        &VpnMask::new(&format!("m{i}"), VpnMaskSpec::default()),
                    )
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>();
    create.await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Churn: delete a third of the masks concurrently, and delete and recreate a provider.
    let deletes = futures::stream::iter((0..MASKS).step_by(3))
        .map(|i| {
            let masks = masks.clone();
            async move {
                masks
                    .delete(&format!("m{i}"), &DeleteParams::default())
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>();
    let providers: Api<VpnProvider> = Api::namespaced(client.clone(), &ns);
    let recreate = async {
        providers
            .delete("p2", &DeleteParams::default())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while providers.get_opt("p2").await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "p2 was not deleted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let uid = provider(&client, &ns, "p2", 3).await;
        seen.lock().unwrap().max_of.insert(uid, 3);
    };
    tokio::join!(deletes, recreate);
    // More masks arrive while the others settle.
    for i in MASKS..MASKS + 10 {
        masks
            .create(
                &PostParams::default(),
                &VpnMask::new(&format!("m{i}"), VpnMaskSpec::default()),
            )
            .await
            .unwrap();
    }

    // Settle: every slot in use (6 in all), every other mask waiting, and the stored
    // reservations exactly the Ready masks' assignments, of live providers: no slot held by a
    // mask that does not show it, none held twice by one mask.
    let total: u32 = PROVIDERS.iter().map(|(_, max)| max).sum();
    let deadline = Instant::now() + Duration::from_mins(1);
    let final_masks = loop {
        {
            let seen = seen.lock().unwrap();
            assert!(
                seen.violations.is_empty(),
                "maxSlots exceeded: {:#?}",
                seen.violations
            );
        }
        let snapshot = Snapshot::read(&client, &ns).await;
        if snapshot.settled(total as usize) {
            break snapshot.masks;
        }
        assert!(
            Instant::now() < deadline,
            "did not settle (want {total} ready): {snapshot}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    for racer in racers {
        racer.stop().await;
    }
    watcher_task.abort();
    let seen = seen.lock().unwrap();
    assert!(
        seen.violations.is_empty(),
        "maxSlots exceeded: {:#?}",
        seen.violations
    );
    assert!(
        seen.events > total as usize,
        "the watcher saw only {} events",
        seen.events
    );
    // Ready masks hold distinct slots.
    let mut slots = BTreeSet::new();
    for mask in &final_masks {
        if let Some(held) = mask.status.as_ref().and_then(|s| s.provider.as_ref()) {
            assert!(
                slots.insert((held.uid.clone(), held.slot)),
                "slot {held:?} assigned twice"
            );
        }
    }
    eprintln!(
        "stress: {} lease events, {} masks settled, {} slots in use",
        seen.events,
        final_masks.len(),
        slots.len()
    );
}
