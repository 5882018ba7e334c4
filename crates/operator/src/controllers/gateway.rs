//! The VpnGateway controller: keeps `spec.exits.count` exits, each a `VpnMask` (a provider slot,
//! a VXLAN identifier) and, once the mask holds its slot, a pod running `cloak agent` in the
//! exit role with one server of the provider's pool; replaces a stopped exit pod with one on the
//! next server; reports every exit's pod, node, provider, slot, server and health, with Events
//! when an exit goes down or comes back.
//!
//! The data path itself (clients' attachment, balancing, failover) is the nodes' job: this
//! controller only makes the exits exist. With it stopped, exits and flows go on.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use cloak_api::{ExitHealth, ExitStatus, Mtu, VpnGateway, VpnGatewayStatus, VpnMask, VpnMaskSpec};
use cloak_model::{clients, credentials, exit, gateway};
use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Node, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        Controller, WatchStreamExt as _,
        controller::Action,
        events::EventType,
        reflector::{ObjectRef, Store},
        watcher,
    },
};

use super::{condition, measured, publish, status::write_if_changed};
use crate::{Context, Error, MANAGER, Result};

const CONTROLLER: &str = "vpngateway";

/// Looks again at least this often: an exit's health comes from pod watches, this is the net.
const RESYNC: Duration = Duration::from_mins(1);

/// The tunnel MTU `auto` assumes while no exit's pod says its own: WireGuard's default, the
/// smallest of the kinds' defaults (OpenVPN's `tun-mtu` is 1500).
const TUNNEL_MTU: u16 = 1420;

/// The gateway controller: its gateways, the exit masks they own, and the exit pods (owned by
/// the masks, so mapped to their gateway by label). Both child watches see only objects
/// labelled as exits. Client pods come in through [`client_triggers`].
pub(crate) fn controller(client: &Client) -> Controller<DeserializeGuard<VpnGateway>> {
    let exits = || watcher::Config::default().labels(exit::LABEL_GATEWAY);
    Controller::new(
        Api::<DeserializeGuard<VpnGateway>>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<DeserializeGuard<VpnMask>>::all(client.clone()),
        exits(),
    )
    .watches(Api::<Pod>::all(client.clone()), exits(), |pod| {
        let gateway = pod.labels().get(exit::LABEL_GATEWAY)?;
        Some(ObjectRef::new(gateway).within(&pod.namespace()?))
    })
}

/// Reconcile requests for the client count: every change to a pod (its metadata is watched,
/// which reports status changes too) asks for the gateway it is a client of now and the one it
/// was before, so a pod that starts, stops, goes or changes its labels is counted at once.
fn client_triggers(
    client: &Client,
    gateways: Store<DeserializeGuard<VpnGateway>>,
) -> impl futures::Stream<Item = ObjectRef<DeserializeGuard<VpnGateway>>> + Send + 'static {
    let mut tracker = ClientTracker::default();
    watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .filter_map(|event| futures::future::ready(event.ok()))
    .flat_map(move |event| {
        let state = gateways.state();
        let valid: Vec<&VpnGateway> = state.iter().filter_map(|g| g.0.as_ref().ok()).collect();
        let choose = |pod: &PartialObjectMeta<Pod>| {
            let ns = pod.namespace().unwrap_or_default();
            match clients::choose(&ns, pod.labels(), valid.iter().copied()) {
                clients::Choice::Gateway(name) => Some((ns, name)),
                clients::Choice::None | clients::Choice::Missing(_) => None,
            }
        };
        let touched = match event {
            watcher::Event::Init => tracker.init(),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let now = choose(&pod);
                tracker.seen(pod.uid().unwrap_or_default(), now)
            }
            watcher::Event::Delete(pod) => {
                let now = choose(&pod);
                tracker.gone(&pod.uid().unwrap_or_default(), now)
            }
            watcher::Event::InitDone => tracker.init_done(),
        };
        futures::stream::iter(
            touched
                .into_iter()
                .map(|(ns, name)| ObjectRef::new(&name).within(&ns)),
        )
    })
}

/// A gateway by namespace and name.
type GatewayKey = (String, String);

/// The gateways a pod's count may have changed in: the one before and the one now, once each.
fn both(before: Option<GatewayKey>, now: Option<GatewayKey>) -> Vec<GatewayKey> {
    let mut touched: Vec<GatewayKey> = before.into_iter().chain(now).collect();
    touched.dedup();
    touched
}

/// Which gateway each client pod (by uid) belonged to when last seen, to ask the old gateway
/// too when a pod leaves it.
#[derive(Default)]
struct ClientTracker {
    of: BTreeMap<String, GatewayKey>,
    /// The pods seen since a relist began; the others went away meanwhile.
    relisted: Option<BTreeSet<String>>,
}

impl ClientTracker {
    /// A pod seen now as a client of `now` (or of none): the gateways whose count it may change.
    fn seen(&mut self, uid: String, now: Option<GatewayKey>) -> Vec<GatewayKey> {
        if let Some(relisted) = &mut self.relisted {
            relisted.insert(uid.clone());
        }
        let before = match &now {
            Some(key) => self.of.insert(uid, key.clone()),
            None => self.of.remove(&uid),
        };
        both(before, now)
    }

    /// A pod gone: the gateway it was seen with, and the one it is a client of by the gateways
    /// now (`now`; it may have been seen before they were known).
    fn gone(&mut self, uid: &str, now: Option<GatewayKey>) -> Vec<GatewayKey> {
        both(self.of.remove(uid), now)
    }

    fn init(&mut self) -> Vec<GatewayKey> {
        self.relisted = Some(BTreeSet::new());
        Vec::new()
    }

    /// A relist is complete: the pods it did not list are gone.
    fn init_done(&mut self) -> Vec<GatewayKey> {
        let listed = self.relisted.take().unwrap_or_default();
        let gone: Vec<String> = self
            .of
            .keys()
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect();
        let mut touched: Vec<GatewayKey> =
            gone.iter().flat_map(|uid| self.gone(uid, None)).collect();
        touched.sort();
        touched.dedup();
        touched
    }
}

#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "VpnGateway", object = %super::object_name(&*guard))
)]
pub(crate) async fn reconcile(
    guard: Arc<DeserializeGuard<VpnGateway>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    measured(&ctx, CONTROLLER, async {
        let gateway = match &guard.0 {
            Ok(gateway) => gateway,
            Err(invalid) => return Err(super::report_invalid::<VpnGateway>(&ctx, invalid).await),
        };
        if gateway.meta().deletion_timestamp.is_some() {
            // Its masks, pods and ConfigMap are its dependents: the garbage collector removes
            // them, each mask releasing its slot once its pod is gone. What it wrote on its
            // Services (not its own) it clears first.
            if gateway
                .finalizers()
                .iter()
                .any(|f| f == super::inbound::FINALIZER)
            {
                super::inbound::finalize(gateway, &ctx).await?;
            }
            return Ok(Action::await_change());
        }
        // The schema refuses a /0; a gateway stored before it did is refused here.
        let intranet: Vec<ipnet::IpNet> = gateway.spec.intranet.iter().map(|c| c.get()).collect();
        if let Some(why) = gateway::intranet_refusal(&intranet) {
            let invalid = kube::core::error_boundary::InvalidObject {
                error: why,
                metadata: gateway.metadata.clone(),
            };
            return Err(super::report_invalid::<VpnGateway>(&ctx, &invalid).await);
        }
        apply(gateway, &ctx).await
    })
    .await
}

/// One exit as found in the cluster.
struct Found {
    mask: VpnMask,
    pod: Option<Pod>,
}

async fn apply(gateway: &VpnGateway, ctx: &Context) -> Result<Action> {
    let ns = gateway.namespace().unwrap_or_default();
    let name = gateway.name_any();
    let owner = gateway
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Invalid("the gateway has no uid yet".into()))?;
    let masks: Api<VpnMask> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mine = ListParams::default().labels(&format!("{}={name}", exit::LABEL_GATEWAY));
    let count = gateway.spec.exits.count.get();
    // A chain's hop: its exits are clients of the gateway before it.
    let upstream = match gateway.spec.exits.through.as_deref() {
        Some(through) => Some(Upstream::read(gateway, through, ctx).await?),
        None => None,
    };
    let wanted: Vec<String> = (0..count).map(|i| gateway::exit_name(&name, i)).collect();

    // Scale-down: exits past the count go (each pod first, then its slot).
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for mask in masks.list(&mine).await?.items {
        let exit_name = mask.name_any();
        if !wanted.contains(&exit_name) {
            if mask.meta().deletion_timestamp.is_none() {
                masks
                    .delete(&exit_name, &DeleteParams::background())
                    .await?;
                tracing::info!(gateway = %name, exit = %exit_name, "exit removed (scale-down)");
            }
            continue;
        }
        found.insert(exit_name, Found { mask, pod: None });
    }
    for pod in pods.list(&mine).await?.items {
        if let Some(f) = pod
            .labels()
            .get(exit::LABEL_EXIT)
            .and_then(|e| found.get_mut(e))
        {
            f.pod = Some(pod);
        }
    }

    // Missing exits get a mask, each with a VXLAN identifier no other exit has. A chain's hop
    // takes its slot once the hop before holds one: the chain's list of providers to avoid
    // then names that one.
    let mut vnis = Vnis::recorded(gateway);
    let may_lease = upstream.as_ref().is_none_or(|u| u.holds_slot);
    for exit_name in &wanted {
        if !found.contains_key(exit_name) && may_lease {
            let (mask, vni) = create_mask(gateway, exit_name, &owner, ctx).await?;
            vnis.assigned.insert(exit_name.clone(), vni);
            found.insert(exit_name.clone(), Found { mask, pod: None });
        }
    }

    // `auto`: what fits the smallest of the exits' tunnels (each pod says its server's) and,
    // wrapped in VXLAN, the pod network.
    // Read from pods a tenant may edit: never outside 576 (IPv4's minimum: a deep chain's hop
    // carries less than IPv6's 1280) to 9000. With no pod to ask
    // (all moving), the last figure stands.
    let tunnel_mtu = found
        .values()
        .filter_map(|f| f.pod.as_ref())
        .filter_map(|p| {
            p.annotations()
                .get(exit::ANNOTATION_TUNNEL_MTU)?
                .parse::<u16>()
                .ok()
        })
        .map(|m| m.clamp(gateway::MIN_LINK_MTU, Mtu::MAX))
        .min()
        .or_else(|| gateway.status.as_ref().and_then(|s| s.mtu))
        .unwrap_or(TUNNEL_MTU);
    let pod_network_mtu = ctx.config.pod_network_mtu;
    let mtu = match gateway.spec.mtu {
        Mtu::Fixed(bytes) => bytes,
        Mtu::Auto => gateway::auto_mtu(tunnel_mtu, pod_network_mtu, false),
    };
    let link_mtu = pod_network_mtu.saturating_sub(gateway::VXLAN_OVERHEAD_V4);
    let intranet: Vec<ipnet::IpNet> = if gateway.spec.intranet.is_empty() {
        cluster_intranet(ctx).await?
    } else {
        gateway.spec.intranet.iter().map(|c| c.get()).collect()
    };
    let dns = gateway.spec.dns.as_ref();
    let drain_grace = drain_grace(gateway);
    let (ports, mut port_problems) = if gateway.spec.ports.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        super::inbound::resolve(gateway, ctx).await?
    };
    let configs = found.iter().filter_map(|(exit_name, f)| {
        let vni = vnis.of(exit_name, &f.mask)?;
        let index = wanted.iter().position(|w| w == exit_name)?;
        let forwards = super::inbound::forwards_for(&ports, index);
        let config = exit::agent_config(&exit::ExitAgent {
            vni,
            mss: gateway::mss(mtu, false),
            probe: &ctx.config.verify_ip_url,
            bypass: &intranet,
            cluster_domains: dns.map_or(&[], |d| d.cluster_domains.as_slice()),
            // The agent's firewall lets DNS through the tunnel to one resolver.
            upstream: dns.and_then(|d| d.upstreams.first().copied()),
            // A running exit drains as long as its pod's grace period allows.
            drain_grace: f
                .pod
                .as_ref()
                .and_then(exit::drain_grace_of)
                .unwrap_or(drain_grace),
            link_mtu,
            underlay_mtu: upstream.as_ref().and_then(|u| u.mtu),
            forwards: &forwards,
        });
        Some((exit_name.clone(), config))
    });
    let config_map = exit::config_map(&name, &ns, &owner, configs)?;
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &exit::config_map_name(&name),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await?;

    // The exits' admin token, made once and kept: their pods mount it, and the operator alone
    // (of every pod) sends it to ask them for their status.
    // Beside it, the metrics reader token's hash, followed when the token changes.
    let admin = exit::admin_secret_name(&name);
    let metrics_hash = metrics_hash(ctx);
    match ctx.secrets.get(&ObjectRef::new(&admin).within(&ns)) {
        None => {
            let secret = exit::admin_secret(
                &name,
                &ns,
                &owner,
                &exit::new_admin_token(),
                metrics_hash.as_deref(),
            )?;
            match Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .create(&PostParams::default(), &secret)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Some(found) => {
            let recorded = found
                .annotations()
                .get(exit::ANNOTATION_METRICS_HASH)
                .filter(|h| !h.is_empty());
            if recorded != metrics_hash.as_ref() {
                Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                    .patch(
                        &admin,
                        &PatchParams::default(),
                        &Patch::Merge(exit::metrics_hash_patch(metrics_hash.as_deref())),
                    )
                    .await?;
            }
        }
    }

    // Pods: one per exit whose mask holds a slot; a stopped one is replaced on the next server.
    let mut servers_in_use: Vec<(String, String)> = found
        .values()
        .filter_map(|f| {
            let provider = f.mask.status.as_ref()?.provider.as_ref()?.uid.clone();
            let server = f
                .pod
                .as_ref()?
                .annotations()
                .get(exit::ANNOTATION_SERVER)?
                .clone();
            Some((provider, server))
        })
        .collect();
    // An exit whose pod stopped, was annotated to move, or whose tunnel has not connected for
    // `moveAfter` moves to its pool's next server: its pod goes, and the next reconcile makes
    // one on the server after the one it used.
    let previous = gateway.status.clone().unwrap_or_default();
    let move_after = gateway
        .spec
        .exits
        .move_after
        .as_ref()
        .map_or(exit::MOVE_AFTER, cloak_api::GoDuration::get);
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut moves: BTreeMap<String, String> = BTreeMap::new();
    let mut next_check = if may_lease { RESYNC } else { UPSTREAM_WAIT };
    for (exit_name, f) in &mut found {
        let Some(held) = f.mask.status.as_ref().and_then(|s| s.provider.clone()) else {
            continue;
        };
        if let Some(pod) = &f.pod {
            let view = exit::PodView::of(pod);
            // Down since the status says, but never since before this pod was made: a status
            // written about the pod it replaced would move a new pod at once.
            let created = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(i64::MIN, |t| t.0.as_second());
            // Behind a gateway that carries nothing (a chain's dead outer hop), no exit is judged:
            // its tunnel cannot connect, whatever its server. Once that gateway is healthy
            // again, the clock starts then.
            let upstream_since = match &upstream {
                Some(u) if !u.healthy => {
                    next_check = next_check.min(UPSTREAM_WAIT);
                    i64::MAX
                }
                Some(u) => u.healthy_since.unwrap_or(i64::MIN),
                None => i64::MIN,
            };
            let down = previous
                .exits
                .iter()
                .find(|e| &e.name == exit_name)
                .filter(|e| matches!(e.health, ExitHealth::Connecting | ExitHealth::Unhealthy))
                .and_then(|e| e.since.as_ref())
                .and_then(|since| {
                    let from = since.0.as_second().max(created).max(upstream_since);
                    u64::try_from(now.as_second().checked_sub(from)?).ok()
                })
                .map(Duration::from_secs);
            // An exit whose node has not been Ready for `moveAfter` moves too, even while its pod
            // is Terminating (evicted from a node whose kubelet cannot confirm it): the pod goes
            // from the API at once, so the same exit (its name, its mask, the one slot the mask
            // holds) starts elsewhere. A kubelet that comes back stops the old pod; until then a
            // node only cut off from the API may still run it, and two connections with one
            // key take the server's peer from each other (a provider may refuse the second).
            let lost = match view.node.as_deref() {
                Some(node) => Api::<Node>::all(ctx.client.clone())
                    .get_opt(node)
                    .await?
                    .and_then(|n| exit::node_down_for(&n, now.as_second()))
                    .map(|down| (node.to_owned(), down)),
                None => None,
            };
            let asked = pod.annotations().contains_key(exit::ANNOTATION_MOVE);
            // Off a lost node the pod goes from the API at once (its kubelet cannot confirm);
            // otherwise it drains as any deleted exit does.
            let moving =
                if let Some((node, lost_for)) = lost.as_ref().filter(|(_, d)| *d >= move_after) {
                    Some((
                        format!(
                            "its node {node} has not been ready for {}s",
                            lost_for.as_secs()
                        ),
                        DeleteParams {
                            grace_period_seconds: Some(0),
                            ..DeleteParams::background()
                        },
                    ))
                } else {
                    if let Some((_, lost_for)) = lost {
                        next_check = next_check
                            .min(move_after.saturating_sub(lost_for) + Duration::from_secs(1));
                    }
                    // Asked to move, a working exit drains its flows first. One whose tunnel
                    // has not connected (or whose pod stopped) carries none (the nodes took it
                    // out when it stopped answering them, and reset its flows): it gets a second
                    // to stop, not a drain, so its replacement starts soon. Not a force delete
                    // (grace 0): the pod stays in the API until its kubelet has stopped it, so
                    // the replacement, on the same slot, never runs beside it.
                    exit::move_reason(&view, asked, down, move_after).map(|why| {
                        let how = if asked {
                            DeleteParams::background()
                        } else {
                            DeleteParams {
                                grace_period_seconds: Some(1),
                                ..DeleteParams::background()
                            }
                        };
                        (why, how)
                    })
                };
            if let Some((why, how)) = moving {
                let from = pod
                    .annotations()
                    .get(exit::ANNOTATION_SERVER)
                    .cloned()
                    .unwrap_or_else(|| "its server".into());
                publish(
                    ctx,
                    gateway,
                    EventType::Warning,
                    "ExitReplaced",
                    format!("exit {exit_name} moves from {from} to its pool's next server: {why}"),
                )
                .await;
                let record = format!("{now} from {from}: {why}");
                let count = moves_of(&f.mask).saturating_add(1);
                // Kept on the mask, read fresh each reconcile: a status written from a cached
                // gateway of before the move must not lose it.
                f.mask = masks
                    .patch(
                        exit_name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                            exit::ANNOTATION_LAST_MOVE: record.clone(),
                            exit::ANNOTATION_MOVES: count.to_string()}}})),
                    )
                    .await?;
                moves.insert(exit_name.clone(), record);
                pods.delete(exit_name, &how).await?;
            } else if let Some(down) = down.filter(|_| !view.ready) {
                // Looked at again when it would be due to move.
                next_check =
                    next_check.min(move_after.saturating_sub(down) + Duration::from_secs(1));
            }
            continue;
        }
        // A chain's hop starts once the hop before it carries traffic: its MTU is then what its
        // own exits' tunnels fit (before, it is a guess), and a tunnel could not connect anyway.
        let underlay = match &upstream {
            Some(Upstream {
                mtu: Some(mtu),
                healthy: true,
                ..
            }) => *mtu,
            Some(_) => {
                next_check = next_check.min(UPSTREAM_WAIT);
                continue;
            }
            None => ctx.config.pod_network_mtu,
        };
        let siblings: Vec<&str> = servers_in_use
            .iter()
            .filter(|(provider, _)| *provider == held.uid)
            .map(|(_, server)| server.as_str())
            .collect();
        let chosen = exit_pod(gateway, exit_name, &f.mask, &held, &siblings, underlay, ctx).await?;
        if let Some(pod) = chosen {
            if let Some(server) = pod.annotations().get(exit::ANNOTATION_SERVER) {
                servers_in_use.push((held.uid.clone(), server.clone()));
            }
            f.pod = Some(pod);
        }
    }

    let attached = count_clients(gateway, ctx).await?;

    // Status.
    let mut exits = Vec::new();
    // The ports the exits say their providers refuse: `<exit>: <name>/<PROTOCOL>: <why>`.
    let mut failures: Vec<String> = Vec::new();
    for (exit_name, f) in &found {
        let was = previous.exits.iter().find(|e| &e.name == exit_name);
        let view = f.pod.as_ref().map(exit::PodView::of);
        let held = f.mask.status.as_ref().and_then(|s| s.provider.as_ref());
        let (health, message) = exit::health(held.is_some(), view.as_ref(), was.map(|w| w.health));
        let since = match was {
            Some(w) if w.health == health => w.since.clone(),
            _ => Some(Time(k8s_openapi::jiff::Timestamp::now())),
        };
        if let Some(w) = was
            && w.health != health
        {
            announce(ctx, gateway, exit_name, w.health, health, &message).await;
        }
        let server = f
            .pod
            .as_ref()
            .and_then(|p| p.annotations().get(exit::ANNOTATION_SERVER).cloned());
        // Known while the exit keeps its server; asked of its agent once it is healthy.
        let known = was
            .filter(|w| w.server == server)
            .and_then(|w| w.public_address.clone());
        // With inbound ports, a healthy exit is asked every time: its ports may change at any
        // renewal.
        let answer = match (health, view.as_ref().and_then(|v| v.ip)) {
            (ExitHealth::Healthy, Some(ip)) if known.is_none() || !ports.is_empty() => {
                ask_status(ctx, &ns, &name, ip).await
            }
            _ => None,
        };
        let public_address = match (&known, &answer) {
            (None, Some(answer)) => exit::public_address(answer).map(|a| a.to_string()),
            _ => known,
        };
        if !ports.is_empty() {
            let prefix = format!("{exit_name}: ");
            match &answer {
                Some(answer) => failures.extend(
                    exit::port_failures(answer)
                        .into_iter()
                        .map(|f| format!("{prefix}{f}")),
                ),
                // Not answering now: what it said last stands while it stays healthy (as its
                // ports do), so the condition does not turn for one missed answer.
                None if health == ExitHealth::Healthy => failures.extend(
                    previous
                        .conditions
                        .iter()
                        .filter(|c| c.type_ == "PortsForwarded" && c.status == "False")
                        .flat_map(|c| c.message.split("; "))
                        .filter(|line| line.starts_with(&prefix))
                        .map(str::to_owned),
                ),
                None => {}
            }
        }
        let forwarded = match (&answer, health) {
            (Some(answer), _) => exit::forwarded_ports(answer),
            // Not answering now: what it said last stands while it stays healthy.
            (None, ExitHealth::Healthy) => was.map(|w| w.ports.clone()).unwrap_or_default(),
            (None, _) => Vec::new(),
        };
        exits.push(ExitStatus {
            name: exit_name.clone(),
            node: view.as_ref().and_then(|v| v.node.clone()),
            vni: vnis.of(exit_name, &f.mask).unwrap_or_default(),
            pod_ip: view.as_ref().and_then(|v| v.ip).map(|ip| ip.to_string()),
            provider: held.map(|h| h.name.clone()),
            slot: held.map(|h| h.slot),
            server,
            public_address,
            health,
            since,
            message: Some(message),
            last_move: moves.remove(exit_name).or_else(|| {
                f.mask
                    .annotations()
                    .get(exit::ANNOTATION_LAST_MOVE)
                    .cloned()
            }),
            moves: moves_of(&f.mask),
            ports: if ports.is_empty() {
                Vec::new()
            } else {
                forwarded
            },
        });
    }
    let has_finalizer = gateway
        .finalizers()
        .iter()
        .any(|f| f == super::inbound::FINALIZER);
    if !gateway.spec.ports.is_empty() || has_finalizer {
        // Before anything is written on a Service, so that it is cleared when the gateway goes.
        super::inbound::set_finalizer(gateway, ctx, true).await?;
        port_problems
            .extend(super::inbound::publish_ports(gateway, ctx, &ports, &exits, &previous).await?);
        // Within one renewal (NAT-PMP's is 30 s) of a change; a healthy exit still waiting
        // for its ports (just started: its requests follow its tunnel) is asked again soon.
        next_check = next_check.min(PORTS_CHECK);
        let waiting = exits.iter().any(|e| {
            let Some(index) = wanted.iter().position(|w| *w == e.name) else {
                return false;
            };
            let asked: usize = super::inbound::forwards_for(&ports, index)
                .iter()
                .map(|f| f.protocols.len())
                .sum();
            // Only for its first half minute: one whose provider refuses is not asked twice a
            // second for ever.
            let fresh = e.since.as_ref().is_some_and(|t| {
                k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second() < 30
            });
            e.health == ExitHealth::Healthy && fresh && e.ports.len() < asked
        });
        if waiting {
            next_check = next_check.min(PORTS_SOON);
        }
        if gateway.spec.ports.is_empty() {
            // Everything cleared by the publish above.
            super::inbound::set_finalizer(gateway, ctx, false).await?;
        }
    }
    let healthy = u32::try_from(
        exits
            .iter()
            .filter(|e| e.health == ExitHealth::Healthy)
            .count(),
    )
    .unwrap_or(u32::MAX);
    let generation = gateway.meta().generation;
    let ready_message = format!("{healthy} of {count} exits healthy");
    let status = VpnGatewayStatus {
        exits,
        healthy_exits: healthy,
        clients: attached,
        mtu: Some(mtu),
        intranet: intranet.iter().map(ToString::to_string).collect(),
        conditions: vec![
            condition(
                &previous.conditions,
                "Ready",
                healthy > 0,
                if healthy > 0 {
                    "ExitsHealthy"
                } else {
                    "NoHealthyExit"
                },
                &ready_message,
                generation,
            ),
            condition(
                &previous.conditions,
                "Degraded",
                healthy < count,
                if healthy < count {
                    "ExitsMissing"
                } else {
                    "AllExitsHealthy"
                },
                &ready_message,
                generation,
            ),
            condition(
                &previous.conditions,
                "KillSwitch",
                gateway.spec.kill_switch,
                if gateway.spec.kill_switch {
                    "On"
                } else {
                    "Off"
                },
                if gateway.spec.kill_switch {
                    "client internet traffic is dropped whenever no exit can carry it"
                } else {
                    "spec.killSwitch is false, which is not implemented yet: client internet traffic is still refused while no exit can carry it"
                },
                generation,
            ),
        ]
        .into_iter()
        .chain((!gateway.spec.ports.is_empty()).then(|| {
            // What the exits' providers refuse (or never answer), as the exits say it.
            condition(
                &previous.conditions,
                "PortsForwarded",
                failures.is_empty(),
                if failures.is_empty() {
                    "NoneRefused"
                } else {
                    "NotForwarded"
                },
                &if failures.is_empty() {
                    "no exit's provider refuses a port".to_owned()
                } else {
                    failures.join("; ")
                },
                generation,
            )
        }))
        .chain((!gateway.spec.ports.is_empty()).then(|| {
            condition(
                &previous.conditions,
                "PortsResolved",
                port_problems.is_empty(),
                if port_problems.is_empty() {
                    "ServicesFound"
                } else {
                    "ServiceProblem"
                },
                &if port_problems.is_empty() {
                    format!("{} port request(s) reach their Services", ports.len())
                } else {
                    port_problems.join("; ")
                },
                generation,
            )
        }))
        .collect(),
        observed_generation: generation,
    };
    let api: Api<VpnGateway> = Api::namespaced(ctx.client.clone(), &ns);
    write_if_changed(&api, &name, &previous, &status, None).await?;
    Ok(Action::requeue(next_check))
}

/// How many of the namespace's running pods are this gateway's clients (its label, or its
/// selector), not counting pods going away.
async fn count_clients(gateway: &VpnGateway, ctx: &Context) -> Result<u32> {
    let ns = gateway.namespace().unwrap_or_default();
    let name = gateway.name_any();
    let listed = Api::<DeserializeGuard<VpnGateway>>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let here: Vec<&VpnGateway> = listed.iter().filter_map(|g| g.0.as_ref().ok()).collect();
    let running = ListParams::default().fields("status.phase=Running");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list_metadata(&running)
        .await?
        .items;
    let count = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            clients::choose(&ns, p.labels(), here.iter().copied())
                == clients::Choice::Gateway(name.clone())
        })
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// The cluster's intranet as it is now (`gateway::cluster_intranet`): the configured ranges,
/// every node's pod CIDRs and internal addresses, and the ServiceCIDRs (a cluster older than
/// their API has none to list: the configured ranges stand for them).
async fn cluster_intranet(ctx: &Context) -> Result<Vec<ipnet::IpNet>> {
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let pod_cidrs: Vec<ipnet::IpNet> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidrs.as_ref())
        .flatten()
        .filter_map(|c| c.parse().ok())
        .collect();
    let addresses: Vec<std::net::IpAddr> = nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let service_cidrs: Vec<ipnet::IpNet> = match Api::<ServiceCIDR>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list
            .items
            .iter()
            .filter_map(|s| s.spec.as_ref()?.cidrs.as_ref())
            .flatten()
            .filter_map(|c| c.parse().ok())
            .collect(),
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let configured: Vec<ipnet::IpNet> = ctx.config.intranet.iter().map(|c| c.get()).collect();
    let derived = gateway::cluster_intranet(&configured, &pod_cidrs, &service_cidrs, &addresses);
    // A Node object that claims everything (a pod CIDR of /0) must not turn every gateway off.
    if let Some(why) = gateway::intranet_refusal(&derived) {
        tracing::warn!(%why, "the cluster's derived intranet is refused; the configured one stands");
        return Ok(configured);
    }
    Ok(derived)
}

fn drain_grace(gateway: &VpnGateway) -> Duration {
    gateway
        .spec
        .exits
        .drain_grace
        .as_ref()
        .map_or(exit::DEFAULT_DRAIN_GRACE, cloak_api::GoDuration::get)
}

/// The SHA-256 of the cluster's metrics reader token, read from its file now (a mounted Secret
/// follows a new token); None without one, or while it cannot be read.
fn metrics_hash(ctx: &Context) -> Option<String> {
    let path = ctx.config.metrics_token_file.as_ref()?;
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Some(exit::token_sha256(token.trim())),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(path = %path.display(), %e, "no metrics reader token");
            None
        }
    }
}

/// How often a gateway with inbound ports asks its exits what is forwarded (NAT-PMP renews
/// every 30 s).
const PORTS_CHECK: Duration = Duration::from_secs(5);
/// How soon a healthy exit that has not said its ports yet is asked again.
const PORTS_SOON: Duration = Duration::from_millis(500);

/// An exit's agent's status answer (the public address its probe saw the tunnel leave with,
/// its forwarded ports), from the agent's admin server. `None` when it cannot tell within a
/// second.
async fn ask_status(
    ctx: &Context,
    namespace: &str,
    gateway: &str,
    pod_ip: std::net::IpAddr,
) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let port = ctx.config.exit_admin_port?;
    let asked = async {
        let token = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
            .get(&exit::admin_secret_name(gateway))
            .await
            .map_err(std::io::Error::other)?
            .data
            .and_then(|d| d.get(exit::ADMIN_TOKEN_KEY).cloned())
            .map(|t| String::from_utf8_lossy(&t.0).trim().to_owned())
            .unwrap_or_default();
        let mut stream = tokio::net::TcpStream::connect((pod_ip, port)).await?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {pod_ip}\r\nAuthorization: Bearer {token}\r\n\r\n",
            exit::STATUS_PATH
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    match tokio::time::timeout(Duration::from_secs(1), asked).await {
        Ok(Ok(answer)) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Ok(Err(e)) => {
            tracing::debug!(%pod_ip, %e, "asking an exit for its public address");
            None
        }
        Err(_) => {
            tracing::debug!(%pod_ip, "asking an exit for its public address: no answer within 1 s");
            None
        }
    }
}

/// The exits' VXLAN identifiers. The record is the gateway's status, which only the operator
/// writes: a mask's annotation is in the tenant's namespace, and a tenant who changed it to
/// another gateway's identifier would share that gateway's links on every node (issue 22).
/// The annotation is read only for an exit the status does not list yet (its mask was made by a
/// reconcile whose status write did not land).
struct Vnis {
    /// From the status.
    recorded: BTreeMap<String, u32>,
    /// Given by this reconcile to the masks it created.
    assigned: BTreeMap<String, u32>,
}

impl Vnis {
    fn recorded(gateway: &VpnGateway) -> Self {
        let recorded = gateway
            .status
            .iter()
            .flat_map(|s| &s.exits)
            .filter(|e| e.vni != 0)
            .map(|e| (e.name.clone(), e.vni))
            .collect();
        Self {
            recorded,
            assigned: BTreeMap::new(),
        }
    }

    fn of(&self, exit_name: &str, mask: &VpnMask) -> Option<u32> {
        self.assigned
            .get(exit_name)
            .or_else(|| self.recorded.get(exit_name))
            .copied()
            .or_else(|| mask.annotations().get(exit::ANNOTATION_VNI)?.parse().ok())
    }
}

/// Creates exit `exit_name`'s mask with the lowest VXLAN identifier no exit of any gateway has
/// (in a gateway's status, or on a mask made before its status was written); returns it with
/// the identifier. Serialized within this operator (the leader is the only writer) and decided on
/// fresh lists, not a cache, so two gateways never get the same identifier.
async fn create_mask(
    gateway: &VpnGateway,
    exit_name: &str,
    owner: &OwnerReference,
    ctx: &Context,
) -> Result<(VpnMask, u32)> {
    let _one_at_a_time = ctx.vni_lock.lock().await;
    let all: Api<VpnMask> = Api::all(ctx.client.clone());
    let mut taken: BTreeSet<u32> = all
        .list_metadata(&ListParams::default().labels(exit::LABEL_GATEWAY))
        .await?
        .items
        .iter()
        .filter_map(|m| m.annotations().get(exit::ANNOTATION_VNI)?.parse().ok())
        .collect();
    taken.extend(
        Api::<DeserializeGuard<VpnGateway>>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|g| g.0.as_ref().ok()?.status.as_ref())
            .flat_map(|s| s.exits.iter().map(|e| e.vni)),
    );
    let vni = gateway::free_vni(&taken)
        .ok_or_else(|| Error::Invalid("every VXLAN identifier is taken".into()))?;
    let ns = gateway.namespace().unwrap_or_default();
    let mask = VpnMask {
        metadata: ObjectMeta {
            name: Some(exit_name.to_owned()),
            namespace: Some(ns.clone()),
            labels: Some(
                [
                    (exit::LABEL_GATEWAY.to_owned(), gateway.name_any()),
                    (
                        crate::labels::MANAGED_BY.to_owned(),
                        crate::labels::MANAGER.to_owned(),
                    ),
                ]
                .into(),
            ),
            annotations: Some([(exit::ANNOTATION_VNI.to_owned(), vni.to_string())].into()),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: VpnMaskSpec {
            providers: gateway.spec.exits.providers.clone(),
            avoid_providers: gateway.spec.exits.avoid_providers.clone(),
        },
        status: None,
    };
    let created = Api::<VpnMask>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &mask)
        .await?;
    tracing::info!(gateway = %gateway.name_any(), exit = exit_name, vni, "exit created");
    Ok((created, vni))
}

/// Creates an exit's pod on the server its pool gives next: after the one its last pod used
/// (rotation), avoiding the servers its siblings on the same provider use. `None` while the
/// mask's credentials copy is not there yet.
async fn exit_pod(
    gateway: &VpnGateway,
    exit_name: &str,
    mask: &VpnMask,
    held: &cloak_api::AssignedProvider,
    siblings: &[&str],
    underlay_mtu: u16,
    ctx: &Context,
) -> Result<Option<Pod>> {
    let ns = gateway.namespace().unwrap_or_default();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(copy) = secrets.get_opt(&held.secret).await? else {
        return Ok(None);
    };
    let data = crate::secret_bytes(&copy);
    let keys = credentials::keys(data.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        .map_err(|e| Error::Invalid(format!("exit {exit_name}: credentials: {e}")))?;
    let pool = credentials::pool(&keys, cloak_model::tunnel::DEFAULT_INTERFACE)
        .map_err(|e| Error::Invalid(format!("exit {exit_name}: credentials: {e}")))?;
    let last = mask
        .annotations()
        .get(exit::ANNOTATION_SERVER)
        .map(String::as_str);
    let Some(server) = credentials::next_server(&pool.servers, last, siblings, &[]) else {
        return Err(Error::Invalid(format!(
            "exit {exit_name}: provider {} has no server the agent can run (gluetun variables name none)",
            held.name
        )));
    };
    let mask_ref = mask
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Invalid(format!("exit {exit_name}: its mask has no uid yet")))?;
    let pod = exit::pod(&exit::ExitPod {
        name: exit_name,
        namespace: &ns,
        gateway: &gateway.name_any(),
        image: &ctx.config.agent_image,
        secret: &held.secret,
        server: &server.name,
        keys: pool.copy_keys(server, &keys),
        tunnel_mtu: gateway::tunnel_fit(&server.tunnel, underlay_mtu),
        owner: OwnerReference {
            block_owner_deletion: Some(true),
            ..mask_ref
        },
        drain_grace: drain_grace(gateway),
    })?;
    let created = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await?;
    // The mask remembers the server, so the exit's next pod moves on to the next one.
    let patch =
        serde_json::json!({"metadata": {"annotations": {exit::ANNOTATION_SERVER: server.name}}});
    Api::<VpnMask>::namespaced(ctx.client.clone(), &ns)
        .patch(exit_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(gateway = %gateway.name_any(), exit = exit_name, server = %server.name, "exit pod created");
    Ok(Some(created))
}

/// How many times an exit has moved (its mask's record).
fn moves_of(mask: &VpnMask) -> u32 {
    mask.annotations()
        .get(exit::ANNOTATION_MOVES)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// How often a chain's hop looks again at the hop before it while that one carries nothing or
/// has not said its MTU.
const UPSTREAM_WAIT: Duration = Duration::from_secs(5);

/// The gateway a gateway's exits run through (`spec.exits.through`), as far as they need it.
struct Upstream {
    /// Its clients' MTU: what the exits' own tunnels must fit. `None` until it says.
    mtu: Option<u16>,
    /// Whether it carries traffic now.
    healthy: bool,
    /// Since when (its `Ready` condition's transition), in seconds.
    healthy_since: Option<i64>,
    /// Whether each of its exits holds a provider's slot.
    holds_slot: bool,
}

impl Upstream {
    /// Reads gateway `through` of `gateway`'s namespace. A `through` that leads back to
    /// `gateway` is refused: its exits would wait on themselves forever.
    async fn read(gateway: &VpnGateway, through: &str, ctx: &Context) -> Result<Self> {
        let ns = gateway.namespace().unwrap_or_default();
        let name = gateway.name_any();
        let api = Api::<DeserializeGuard<VpnGateway>>::namespaced(ctx.client.clone(), &ns);
        let mut next = Some(through.to_owned());
        let mut first: Option<VpnGateway> = None;
        // A chain is at most 8 hops; 16 steps tell a loop from any chain.
        for _ in 0..16 {
            let Some(step) = next.take() else { break };
            if step == name {
                return Err(Error::Invalid(format!(
                    "gateway {name}: spec.exits.through leads back to itself (through {through})"
                )));
            }
            let Some(found) = api.get_opt(&step).await?.and_then(|g| g.0.ok()) else {
                break;
            };
            next.clone_from(&found.spec.exits.through);
            first.get_or_insert(found);
        }
        let status = first.and_then(|g| g.status).unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == "True");
        Ok(Self {
            mtu: status.mtu,
            holds_slot: !status.exits.is_empty()
                && status.exits.iter().all(|e| e.provider.is_some()),
            healthy: status.healthy_exits > 0,
            healthy_since: ready.map(|c| c.last_transition_time.0.as_second()),
        })
    }
}

/// An Event when an exit stops carrying flows or starts again, naming it and the reason.
async fn announce(
    ctx: &Context,
    gateway: &VpnGateway,
    exit_name: &str,
    was: ExitHealth,
    now: ExitHealth,
    message: &str,
) {
    let (type_, reason) = match (was, now) {
        (ExitHealth::Healthy, _) => (EventType::Warning, "ExitDown"),
        (_, ExitHealth::Healthy) if was == ExitHealth::Unhealthy => {
            (EventType::Normal, "ExitRecovered")
        }
        (_, ExitHealth::Healthy) => (EventType::Normal, "ExitUp"),
        _ => return,
    };
    publish(
        ctx,
        gateway,
        type_,
        reason,
        format!("exit {exit_name}: {was:?} -> {now:?}: {message}"),
    )
    .await;
}

/// Runs the controller until `stop`.
pub(crate) async fn run(ctx: Arc<Context>, stop: tokio::sync::watch::Receiver<bool>) {
    let controller = controller(&ctx.client);
    let _ = ctx.gateways.set(controller.store());
    let triggers = client_triggers(&ctx.client, controller.store());
    super::run(controller, reconcile, ctx, triggers, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> GatewayKey {
        ("apps".into(), name.into())
    }

    #[test]
    fn a_pod_asks_for_its_gateway_and_the_one_it_left_and_a_relist_finds_the_gone() {
        let mut t = ClientTracker::default();
        assert_eq!(t.seen("p1".into(), Some(key("a"))), vec![key("a")]);
        assert_eq!(t.seen("p1".into(), Some(key("a"))), vec![key("a")]);
        assert_eq!(
            t.seen("p1".into(), Some(key("b"))),
            vec![key("a"), key("b")],
            "relabelled from a to b"
        );
        assert_eq!(t.seen("p1".into(), None), vec![key("b")]);
        assert_eq!(t.seen("p1".into(), None), Vec::<GatewayKey>::new());
        t.seen("p2".into(), Some(key("a")));
        assert_eq!(t.gone("p2", None), vec![key("a")]);
        assert_eq!(t.gone("p2", None), Vec::<GatewayKey>::new());

        t.seen("p3".into(), Some(key("a")));
        t.seen("p4".into(), Some(key("b")));
        t.init();
        t.seen("p4".into(), Some(key("b")));
        assert_eq!(t.init_done(), vec![key("a")], "p3 went during the relist");
        assert_eq!(t.gone("p4", None), vec![key("b")]);
    }
}
