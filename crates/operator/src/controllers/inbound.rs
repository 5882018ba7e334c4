//! A gateway's inbound ports (`spec.ports`): each request resolved to its Service's cluster
//! address (only a Service of the gateway's own namespace, with a selector: a request cannot
//! name another tenant's Service, nor one whose hand-written endpoints point anywhere), told
//! to every exit's agent, and what the exits' providers forward published
//! where applications and people read it: the gateway's status (per exit), an annotation on
//! the Service, the ConfigMap `<gateway>-ports`, and an Event on every change.

use std::{collections::BTreeMap, net::SocketAddrV4};

use cloak_api::{ExitStatus, PortProtocol, PortRequest, VpnGateway, VpnGatewayStatus};
use cloak_model::{
    exit::{Backend, ExitForward},
    natpmp::Protocol,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServicePort};
use kube::{
    Api, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams},
    core::DeserializeGuard,
    runtime::events::EventType,
};

use super::publish;
use crate::{Context, MANAGER, Result};

/// The annotation on a Service listing the addresses its ports are forwarded from:
/// `<address>:<port>/<tcp|udp>`, space-separated.
pub(crate) const ANNOTATION: &str = "cloak.dev/forwarded-ports";

/// The annotation on `<gateway>-ports` naming the Services annotated from it.
const SERVICES: &str = "cloak.dev/services";
/// The annotation on a Service naming the gateway that publishes its forwarded ports: one
/// gateway a Service, and only that one clears it.
pub(crate) const PUBLISHER: &str = "cloak.dev/forwarded-by";
/// The gateway's finalizer while it has published ports: its Services' annotations are cleared
/// before it goes.
pub(crate) const FINALIZER: &str = "cloak.dev/forwarded-ports";

/// A request with the address it reaches.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) request: PortRequest,
    pub(crate) target: SocketAddrV4,
    /// The Service's backends when all are clients of the gateway (see [`client_backends`]).
    pub(crate) backends: Vec<Backend>,
}

/// The ConfigMap publishing a gateway's forwarded ports.
pub(crate) fn config_map_name(gateway: &str) -> String {
    cloak_model::names::join(&[gateway, "ports"])
}

fn protocols(p: PortProtocol) -> Vec<Protocol> {
    match p {
        PortProtocol::Tcp => vec![Protocol::Tcp],
        PortProtocol::Udp => vec![Protocol::Udp],
        PortProtocol::Both => vec![Protocol::Tcp, Protocol::Udp],
    }
}

/// The gateway's requests with their Services' addresses, and what is wrong with the others.
pub(crate) async fn resolve(
    gateway: &VpnGateway,
    ctx: &Context,
) -> Result<(Vec<Resolved>, Vec<String>)> {
    let ns = gateway.namespace().unwrap_or_default();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let (mut resolved, mut problems) = (Vec::new(), Vec::new());
    let mut names = std::collections::BTreeSet::new();
    // (protocol, internal port): NAT-PMP maps one internal port once, and the exit's rules
    // tell requests apart by it.
    let mut internal = std::collections::BTreeSet::new();
    // The namespace's gateways (which one a pod is a client of), listed once if asked.
    let mut gateways: Option<Vec<VpnGateway>> = None;
    for request in &gateway.spec.ports {
        // The schema says so; an object stored before it did is refused here. The name is a
        // ConfigMap key and part of the exit's rules.
        if !cloak_model::names::is_dns_label(&request.name) {
            problems.push(format!(
                "port {:?}: the name must be a DNS label (lowercase letters, digits, '-')",
                request.name
            ));
            continue;
        }
        if !names.insert(request.name.as_str()) {
            problems.push(format!("port {}: the name is used twice", request.name));
            continue;
        }
        if request.port == Some(0) || request.static_ports.contains(&0) {
            problems.push(format!("port {}: port 0 is not a port", request.name));
            continue;
        }
        let Some(service) = services.get_opt(&request.service).await? else {
            problems.push(format!(
                "port {}: no Service {ns}/{}",
                request.name, request.service
            ));
            continue;
        };
        let spec = service.spec.unwrap_or_default();
        // Without a selector a Service sends to whatever endpoints are written for it: any
        // address of the cluster (a node's kubelet) would be opened to the internet.
        if spec.selector.as_ref().is_none_or(BTreeMap::is_empty)
            || spec.type_.as_deref() == Some("ExternalName")
        {
            problems.push(format!(
                "port {}: Service {} has no selector (its endpoints could be any address)",
                request.name, request.service
            ));
            continue;
        }
        let ip = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok());
        let Some(ip) = ip else {
            problems.push(format!(
                "port {}: Service {} has no IPv4 cluster address (headless?)",
                request.name, request.service
            ));
            continue;
        };
        let ports = spec.ports.unwrap_or_default();
        let service_port = match request.port {
            Some(p) => ports.iter().find(|sp| sp.port == i32::from(p)),
            None => ports.first(),
        };
        let Some((service_port, port)) =
            service_port.and_then(|sp| Some((sp, u16::try_from(sp.port).ok()?)))
        else {
            problems.push(format!(
                "port {}: Service {} has no port {}",
                request.name,
                request.service,
                request
                    .port
                    .map_or_else(|| "at all".into(), |p| p.to_string())
            ));
            continue;
        };
        // A static port arrives as it is; a dynamic one on the Service's port number.
        let keys: Vec<(Protocol, u16)> = if request.static_ports.is_empty() {
            protocols(request.protocol)
                .into_iter()
                .map(|p| (p, port))
                .collect()
        } else {
            request
                .static_ports
                .iter()
                .flat_map(|s| {
                    protocols(request.protocol)
                        .into_iter()
                        .map(move |p| (p, *s))
                })
                .collect()
        };
        if let Some((protocol, port)) = keys.iter().find(|key| internal.contains(*key)) {
            problems.push(format!(
                "port {}: {port}/{} is asked for by another request already",
                request.name,
                protocol.as_str()
            ));
            continue;
        }
        internal.extend(keys);
        let selector = spec.selector.clone().unwrap_or_default();
        let backends =
            client_backends(gateway, ctx, &mut gateways, &selector, service_port).await?;
        resolved.push(Resolved {
            request: request.clone(),
            target: SocketAddrV4::new(ip, port),
            backends,
        });
    }
    Ok((resolved, problems))
}

/// The Service's ready backends, when every pod it selects is a client of `gateway`: their
/// replies go through the gateway's exits anyway, so an exit sends them the remote's
/// connections over the links with the remote's address kept. Empty otherwise, and the exit
/// then masquerades to the Service's cluster address: when a selected pod is no client (its
/// replies would go elsewhere), shares its node's network (`hostNetwork`: never a client, and
/// its address is the node's), or is Ready with no address, node or port to send to. A failed
/// list fails the reconcile (tried again with its backoff) rather than turn every exit to the
/// cluster address for one API error.
async fn client_backends(
    gateway: &VpnGateway,
    ctx: &Context,
    gateways: &mut Option<Vec<VpnGateway>>,
    selector: &BTreeMap<String, String>,
    service_port: &ServicePort,
) -> Result<Vec<Backend>> {
    let ns = gateway.namespace().unwrap_or_default();
    let labels = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&labels))
        .await?
        .items;
    if pods.is_empty()
        || pods
            .iter()
            .any(|p| p.spec.as_ref().and_then(|s| s.host_network) == Some(true))
    {
        return Ok(Vec::new());
    }
    let gateways: &[VpnGateway] = match gateways {
        Some(listed) => listed,
        None => gateways.insert(
            Api::<DeserializeGuard<VpnGateway>>::namespaced(ctx.client.clone(), &ns)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|g| g.0.ok())
                .collect(),
        ),
    };
    let name = gateway.name_any();
    let ours = |pod: &Pod| {
        cloak_model::clients::choose(&ns, pod.labels(), gateways)
            == cloak_model::clients::Choice::Gateway(name.clone())
    };
    if !pods.iter().all(ours) {
        return Ok(Vec::new());
    }
    let ready: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .collect();
    let mut backends: Vec<Backend> = ready
        .iter()
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let address = status.pod_ip.as_deref()?.parse().ok()?;
            // The node's address as its `cloak node` takes it (the chart passes it
            // `status.hostIP`), so the transit address is the one that node holds.
            let host = status.host_ip.as_deref()?.parse().ok()?;
            let port = target_port(p, service_port)?;
            Some(Backend {
                address: SocketAddrV4::new(address, port),
                node: cloak_model::gateway::transit_for(host),
            })
        })
        .collect();
    if backends.len() != ready.len() {
        return Ok(Vec::new());
    }
    backends.sort();
    Ok(backends)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The port `pod` listens on for `service_port`: its target port by number, or the pod's
/// container port of that name.
fn target_port(pod: &Pod, service_port: &ServicePort) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &service_port.target_port {
        None => u16::try_from(service_port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// What exit number `index` (`exit-0` first) is told.
pub(crate) fn forwards_for(resolved: &[Resolved], index: usize) -> Vec<ExitForward> {
    resolved
        .iter()
        .filter_map(|r| {
            // Static ports: one per exit; an exit past the list gets none of this request.
            let external = if r.request.static_ports.is_empty() {
                None
            } else {
                Some(*r.request.static_ports.get(index)?)
            };
            Some(ExitForward {
                name: r.request.name.clone(),
                protocols: protocols(r.request.protocol),
                target: r.target,
                external,
                gateway: r.request.nat_pmp_gateway,
                backends: r.backends.clone(),
            })
        })
        .collect()
}

/// `address:port/proto` of every forwarded port of `request`, over the exits, sorted.
fn published(exits: &[ExitStatus], request: &str) -> Vec<String> {
    let mut out: Vec<String> = exits
        .iter()
        .filter_map(|e| Some((e.public_address.as_ref()?, &e.ports)))
        .flat_map(|(address, ports)| {
            ports
                .iter()
                .filter(|p| p.name == request)
                .map(move |p| format!("{address}:{}/{}", p.port, p.protocol.to_lowercase()))
        })
        .collect();
    out.sort();
    out
}

/// Publishes the exits' forwarded ports: the ConfigMap `<gateway>-ports` (a key a request: its
/// `address:port/proto` lines; `<request>.ports`: its distinct external ports), the annotation
/// on each Service, and an Event for each request whose ports changed since `previous`.
pub(crate) async fn publish_ports(
    gateway: &VpnGateway,
    ctx: &Context,
    resolved: &[Resolved],
    exits: &[ExitStatus],
    previous: &VpnGatewayStatus,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let ns = gateway.namespace().unwrap_or_default();
    let name = gateway.name_any();
    let mut data = BTreeMap::new();
    let mut per_service: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in resolved {
        let now = published(exits, &r.request.name);
        let before = published(&previous.exits, &r.request.name);
        if now != before {
            let note = if now.is_empty() {
                format!("port {}: no exit has a forwarded port now", r.request.name)
            } else {
                format!(
                    "port {} is forwarded from {}",
                    r.request.name,
                    now.join(", ")
                )
            };
            publish(ctx, gateway, EventType::Normal, "PortsChanged", note).await;
        }
        let mut ports: Vec<String> = now
            .iter()
            .filter_map(|a| {
                a.rsplit_once(':')
                    .map(|(_, p)| p.split('/').next().unwrap_or(p).to_owned())
            })
            .collect();
        ports.sort();
        ports.dedup();
        data.insert(format!("{}.ports", r.request.name), ports.join(" "));
        data.insert(r.request.name.clone(), now.join("\n"));
        per_service
            .entry(r.request.service.as_str())
            .or_default()
            .extend(now);
    }
    let owner = kube::Resource::controller_owner_ref(gateway, &());
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = maps.get_opt(&config_map_name(&name)).await?;
    // Somebody else's ConfigMap of that name is left alone.
    let uid = gateway.uid().unwrap_or_default();
    if let Some(other) = existing
        .as_ref()
        .filter(|m| !m.owner_references().iter().any(|o| o.uid == uid))
    {
        problems.push(format!(
            "ConfigMap {ns}/{} exists and is not this gateway's: the forwarded ports are not published there",
            other.name_any()
        ));
        return Ok(problems);
    }
    // The Services annotated last time: one no request names now loses the annotation.
    let annotated_before = annotated_services(existing.as_ref());
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    // A Service another gateway publishes to is left to it.
    let mut services_now: Vec<&str> = Vec::new();
    let mut found: BTreeMap<&str, Service> = BTreeMap::new();
    for service in per_service.keys() {
        let current = services.get_opt(service).await?;
        let publisher = current
            .as_ref()
            .and_then(|s| s.annotations().get(PUBLISHER).cloned());
        if let Some(current) = current {
            found.insert(service, current);
        }
        match publisher {
            Some(other) if other != name => problems.push(format!(
                "Service {service}: its forwarded ports are published by gateway {other}"
            )),
            _ => services_now.push(service),
        }
    }
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&name)),
            namespace: Some(ns.clone()),
            annotations: Some(BTreeMap::from([(
                SERVICES.to_owned(),
                services_now.join(","),
            )])),
            owner_references: owner.map(|o| vec![o]),
            labels: Some(BTreeMap::from([(
                cloak_model::exit::LABEL_GATEWAY.to_owned(),
                name.clone(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    };
    maps.patch(
        &config_map_name(&name),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&map),
    )
    .await?;
    for gone in annotated_before
        .iter()
        .filter(|s| !services_now.contains(&s.as_str()))
    {
        clear_service(&services, gone, &name).await?;
    }
    for (service, mut addresses) in per_service {
        if !services_now.contains(&service) {
            continue;
        }
        addresses.sort();
        let value = addresses.join(" ");
        // As read above: one read of each Service a reconcile.
        let Some(current) = found.get(service) else {
            continue;
        };
        if current.annotations().get(ANNOTATION) == Some(&value)
            && current.annotations().get(PUBLISHER) == Some(&name)
        {
            continue;
        }
        let patch =
            serde_json::json!({"metadata": {"annotations": {ANNOTATION: value, PUBLISHER: name}}});
        services
            .patch(service, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(problems)
}

/// The Services a gateway's `<gateway>-ports` says it annotated.
fn annotated_services(map: Option<&ConfigMap>) -> Vec<String> {
    map.and_then(|m| m.annotations().get(SERVICES).cloned())
        .map(|s| {
            s.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes gateway `gateway`'s annotations from Service `service` (not another gateway's).
async fn clear_service(services: &Api<Service>, service: &str, gateway: &str) -> Result<()> {
    if let Some(current) = services.get_opt(service).await?
        && current.annotations().get(PUBLISHER).map(String::as_str) == Some(gateway)
    {
        let patch =
            serde_json::json!({"metadata": {"annotations": {ANNOTATION: null, PUBLISHER: null}}});
        services
            .patch(service, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// A gateway going away: its Services' annotations are cleared, then its finalizer removed.
pub(crate) async fn finalize(gateway: &VpnGateway, ctx: &Context) -> Result<()> {
    let ns = gateway.namespace().unwrap_or_default();
    let name = gateway.name_any();
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = maps.get_opt(&config_map_name(&name)).await?;
    for service in annotated_services(existing.as_ref()) {
        clear_service(&services, &service, &name).await?;
    }
    set_finalizer(gateway, ctx, false).await
}

/// Adds (`on`) or removes the gateway's [`FINALIZER`] when it is not so already. The list is
/// written with the gateway's resourceVersion: a concurrent change makes it fail and retry.
pub(crate) async fn set_finalizer(gateway: &VpnGateway, ctx: &Context, on: bool) -> Result<()> {
    let mut finalizers = gateway.finalizers().to_vec();
    if finalizers.iter().any(|f| f == FINALIZER) == on {
        return Ok(());
    }
    if on {
        finalizers.push(FINALIZER.to_owned());
    } else {
        finalizers.retain(|f| f != FINALIZER);
    }
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": gateway.resource_version(),
    }});
    Api::<VpnGateway>::namespaced(ctx.client.clone(), &gateway.namespace().unwrap_or_default())
        .patch(
            &gateway.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, static_ports: Vec<u16>) -> Resolved {
        Resolved {
            request: PortRequest {
                name: name.into(),
                service: "web".into(),
                port: None,
                protocol: PortProtocol::Both,
                static_ports,
                nat_pmp_gateway: None,
            },
            target: "10.96.0.50:80".parse().unwrap(),
            backends: Vec::new(),
        }
    }

    #[test]
    fn static_ports_go_one_to_an_exit_and_dynamic_ones_to_every_exit() {
        let resolved = [
            request("fixed", vec![51413, 51414]),
            request("asked", vec![]),
        ];
        let first = forwards_for(&resolved, 0);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].external, Some(51413));
        assert_eq!(first[0].protocols, vec![Protocol::Tcp, Protocol::Udp]);
        assert_eq!(first[1].external, None);
        assert_eq!(forwards_for(&resolved, 1)[0].external, Some(51414));
        // A third exit has no static port of its own: it serves only the asked one.
        let third = forwards_for(&resolved, 2);
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].name, "asked");
    }

    #[test]
    fn a_requests_ports_are_published_as_address_port_protocol_over_the_exits() {
        let exit = |address: &str, port: u16| ExitStatus {
            name: "e".into(),
            node: None,
            vni: 0,
            pod_ip: None,
            provider: None,
            slot: None,
            server: None,
            public_address: Some(address.into()),
            health: cloak_api::ExitHealth::Healthy,
            since: None,
            message: None,
            last_move: None,
            moves: 0,
            ports: vec![
                cloak_api::ForwardedPort {
                    name: "web".into(),
                    protocol: "TCP".into(),
                    port,
                },
                cloak_api::ForwardedPort {
                    name: "other".into(),
                    protocol: "UDP".into(),
                    port: 1,
                },
            ],
        };
        assert_eq!(
            published(
                &[exit("198.51.100.12", 40002), exit("198.51.100.11", 40001)],
                "web"
            ),
            vec!["198.51.100.11:40001/tcp", "198.51.100.12:40002/tcp"]
        );
    }
}
