//! A gateway's desired state as values: the routes a client gets (the complement of its
//! intranet), the MTU `auto` computes, the MSS clamped to it, the exits' names and the VXLAN
//! network identifiers that tell a node's links to them apart.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::names;

/// Bytes VXLAN adds over an IPv4 underlay: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14). Seed 002 says the same: a VXLAN link is at most 50 below its device.
pub const VXLAN_OVERHEAD_V4: u16 = 50;
/// The same over an IPv6 underlay (outer header 40 instead of 20).
pub const VXLAN_OVERHEAD_V6: u16 = 70;
/// The UDP port of every gateway link: clear of the CNIs' VXLAN ports (4789 standard, 8472
/// flannel and Linux's default), so a node's own overlay never takes a gateway's packets.
pub const VXLAN_PORT: u16 = 4790;
/// The first VXLAN network identifier given to an exit; below it are the ones CNIs pick by
/// default (flannel 1, Cilium 2, ...).
pub const FIRST_VNI: u32 = 4096;
/// The last one (VNIs are 24 bits).
pub const LAST_VNI: u32 = (1 << 24) - 1;

/// Every prefix of both families that `intranet` does not cover: the routes a client sends
/// through the gateway, as seed 002 computes them by hand (routing everything else with one
/// default route would replace the route its primary network put there). Minimal: no two
/// returned prefixes can be merged, and none overlaps an intranet prefix.
pub fn complement(intranet: &[IpNet]) -> Vec<IpNet> {
    let v4: Vec<IpNet> = intranet
        .iter()
        .filter(|n| matches!(n, IpNet::V4(_)))
        .map(IpNet::trunc)
        .collect();
    let v6: Vec<IpNet> = intranet
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)))
        .map(IpNet::trunc)
        .collect();
    let mut out = Vec::new();
    subtract(IpNet::V4(Ipv4Net::default()), &v4, &mut out);
    subtract(IpNet::V6(Ipv6Net::default()), &v6, &mut out);
    out
}

/// Why `intranet` cannot be a gateway's: it covers every IPv4 or every IPv6 address (a /0, or
/// prefixes that add up to one), so nothing of that family would go through an exit and the
/// gateway would protect nothing while looking as if it did. None: it leaves something to them.
pub fn intranet_refusal(intranet: &[IpNet]) -> Option<String> {
    let rest = complement(intranet);
    let covered: Vec<&str> = [("IPv4", true), ("IPv6", false)]
        .into_iter()
        .filter(|(_, v4)| !rest.iter().any(|n| matches!(n, IpNet::V4(_)) == *v4))
        .map(|(family, _)| family)
        .collect();
    (!covered.is_empty()).then(|| {
        format!(
            "the intranet covers every {} address: nothing would go through the exits",
            covered.join(" and every ")
        )
    })
}

/// Pushes the parts of `range` no prefix of `holes` covers, splitting it in halves where a hole
/// lies inside.
fn subtract(range: IpNet, holes: &[IpNet], out: &mut Vec<IpNet>) {
    if holes.iter().any(|hole| hole.contains(&range)) {
        return;
    }
    if !holes.iter().any(|hole| range.contains(hole)) {
        out.push(range);
        return;
    }
    // Some hole is strictly inside `range`, so `range` is no host route and has two halves
    // (`subnets` fails only for a prefix longer than the address).
    if let Ok(halves) = range.subnets(range.prefix_len() + 1) {
        for half in halves {
            subtract(half, holes, out);
        }
    }
}

/// A gateway's default intranet, derived from the cluster: the configured ranges (the chart's
/// `cluster.intranet`), the nodes' pod CIDRs, the ServiceCIDRs and each node's own addresses
/// (the kubelet probes from them under some CNIs; NodePorts with `externalTrafficPolicy: Local`
/// answer on them). Sorted, each range once, none inside another.
pub fn cluster_intranet(
    configured: &[IpNet],
    pod_cidrs: &[IpNet],
    service_cidrs: &[IpNet],
    node_addresses: &[std::net::IpAddr],
) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = configured
        .iter()
        .chain(pod_cidrs)
        .chain(service_cidrs)
        .map(IpNet::trunc)
        .chain(node_addresses.iter().map(|a| IpNet::from(*a)))
        .collect();
    all.sort();
    all.dedup();
    let kept: Vec<IpNet> = all
        .iter()
        .filter(|net| {
            !all.iter()
                .any(|other| other != *net && other.contains(*net))
        })
        .copied()
        .collect();
    kept
}

/// What a tunnel adds to each packet it carries, by kind: WireGuard 80 (an IPv6 outer header
/// 40, UDP 8, WireGuard 32: wg-quick's allowance), OpenVPN 72 (an IPv6 outer header 40, UDP 8,
/// and up to 24 of its own: opcode and peer id, packet id, an AEAD tag).
pub fn tunnel_overhead(tunnel: &crate::tunnel::TunnelConfig) -> u16 {
    match tunnel {
        crate::tunnel::TunnelConfig::WireGuard(_) => 80,
        crate::tunnel::TunnelConfig::OpenVpn(_) => 72,
    }
}

/// The smallest MTU a link is given: IPv4's minimum. A link under 1280 bytes (a deep chain's)
/// carries IPv4 alone.
pub const MIN_LINK_MTU: u16 = 576;

/// The largest packet a server's tunnel carries whole from an exit whose own network (the pod
/// network, or the hop before it for a chain's hop) has `underlay_mtu`: its configured MTU (or
/// its kind's default), and no more than fits that network with the tunnel's overhead. Within
/// [`MIN_LINK_MTU`] and 9000.
pub fn tunnel_fit(tunnel: &crate::tunnel::TunnelConfig, underlay_mtu: u16) -> u16 {
    let configured = u16::try_from(tunnel.mtu()).unwrap_or(u16::MAX);
    configured
        .min(underlay_mtu.saturating_sub(tunnel_overhead(tunnel)))
        .clamp(MIN_LINK_MTU, 9000)
}

/// The MTU `mtu: auto` gives a client's gateway interface: what fits both into the exit's tunnel
/// and, wrapped in VXLAN, into the pod network between the client's node and the exit.
pub fn auto_mtu(tunnel_mtu: u16, pod_network_mtu: u16, pod_network_is_ipv6: bool) -> u16 {
    let overhead = if pod_network_is_ipv6 {
        VXLAN_OVERHEAD_V6
    } else {
        VXLAN_OVERHEAD_V4
    };
    tunnel_mtu.min(pod_network_mtu.saturating_sub(overhead))
}

/// The TCP MSS that fits `mtu` (IPv4: 20 bytes of IP and 20 of TCP; IPv6: 40 and 20).
pub fn mss(mtu: u16, ipv6: bool) -> u16 {
    mtu.saturating_sub(if ipv6 { 60 } else { 40 })
}

/// The name of a gateway's exit number `index`: its VpnMask and its pod are called so.
pub fn exit_name(gateway: &str, index: u32) -> String {
    names::join(&[gateway, "exit", &index.to_string()])
}

/// The VXLAN network identifier for a new exit: the lowest from [`FIRST_VNI`] that no exit in
/// `taken` has. A node keeps one link per exit it sends to, and two links with one identifier
/// on one port cannot share a namespace, so identifiers are unique among all gateways' exits.
/// `None` only when all 16.7 million are taken.
pub fn free_vni(taken: &BTreeSet<u32>) -> Option<u32> {
    (FIRST_VNI..=LAST_VNI).find(|vni| !taken.contains(vni))
}

/// Whether `address` lies in any of `intranet`: such a destination never goes through an exit.
pub fn is_intranet(address: IpAddr, intranet: &[IpNet]) -> bool {
    intranet.iter().any(|net| net.contains(&address))
}

/// The node's transit address derived from its own IPv4 address: `198.19.<c>.<d>` for
/// `a.b.c.d`, unique among nodes whose addresses differ in their last two bytes (avoiding the
/// exits' `198.19.0.1`).
pub fn transit_for(node_ip: std::net::Ipv4Addr) -> std::net::Ipv4Addr {
    let [_, _, c, d] = node_ip.octets();
    match (c, d) {
        (0, 0 | 1) | (255, 255) => std::net::Ipv4Addr::new(198, 19, 255, 254),
        _ => std::net::Ipv4Addr::new(198, 19, c, d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn strings(list: &[IpNet]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn with_no_intranet_everything_goes_through_the_gateway() {
        assert_eq!(strings(&complement(&[])), ["0.0.0.0/0", "::/0"]);
    }

    #[test]
    fn the_complement_of_ten_slash_eight_is_seed_002s_list() {
        // Seed 002 writes these routes by hand for an intranet of 10.0.0.0/8.
        let v4: Vec<String> = strings(&complement(&nets(&["10.0.0.0/8"])))
            .into_iter()
            .filter(|n| !n.contains(':'))
            .collect();
        assert_eq!(
            v4,
            [
                "0.0.0.0/5",
                "8.0.0.0/7",
                "11.0.0.0/8",
                "12.0.0.0/6",
                "16.0.0.0/4",
                "32.0.0.0/3",
                "64.0.0.0/2",
                "128.0.0.0/1"
            ]
        );
    }

    #[test]
    fn the_complement_covers_every_address_outside_the_intranet_exactly_once() {
        let intranet = nets(&[
            "10.244.0.0/16",
            "10.96.0.0/12",
            "192.168.1.7/32",
            "fd00::/8",
        ]);
        let routes = complement(&intranet);
        let probes = [
            "0.0.0.0",
            "10.95.255.255",
            "10.96.0.1",
            "10.111.255.255",
            "10.112.0.0",
            "10.244.3.4",
            "10.245.0.0",
            "192.168.1.6",
            "192.168.1.7",
            "192.168.1.8",
            "255.255.255.255",
            "fd12::1",
            "fe80::1",
            "2001:db8::1",
            "::",
        ];
        for probe in probes {
            let address: IpAddr = probe.parse().unwrap();
            let covering = routes.iter().filter(|r| r.contains(&address)).count();
            let inside = is_intranet(address, &intranet);
            assert_eq!(
                covering,
                usize::from(!inside),
                "{probe}: covered by {covering} routes, intranet {inside}"
            );
        }
        for route in &routes {
            for hole in &intranet {
                assert!(
                    !route.contains(hole) && !hole.contains(route),
                    "{route} vs {hole}"
                );
            }
        }
    }

    #[test]
    fn overlapping_intranet_prefixes_are_one_hole() {
        let once = complement(&nets(&["10.0.0.0/8"]));
        let overlapped = complement(&nets(&["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/8"]));
        assert_eq!(once, overlapped);
    }

    #[test]
    fn an_intranet_of_everything_leaves_no_route() {
        assert!(complement(&nets(&["0.0.0.0/0", "::/0"])).is_empty());
    }

    #[test]
    fn auto_mtu_is_the_tunnel_or_the_pod_network_less_vxlan_whichever_is_smaller() {
        assert_eq!(auto_mtu(1420, 1500, false), 1420);
        assert_eq!(
            auto_mtu(1420, 1450, false),
            1400,
            "flannel's 1450 under VXLAN"
        );
        assert_eq!(auto_mtu(1420, 1450, true), 1380);
        assert_eq!(auto_mtu(1500, 9000, false), 1500);
        assert_eq!(mss(1420, false), 1380);
        assert_eq!(mss(1420, true), 1360);
    }

    #[test]
    fn the_clusters_intranet_joins_its_ranges_and_node_addresses_once_each() {
        let addresses: Vec<std::net::IpAddr> = ["10.250.0.11", "10.244.1.1", "fd00::11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let intranet = cluster_intranet(
            &nets(&["10.244.0.0/16", "10.96.0.0/12"]),
            &nets(&["10.42.0.0/24", "10.42.1.0/24", "10.244.3.0/24"]),
            &nets(&["10.43.0.0/16", "10.96.0.0/16"]),
            &addresses,
        );
        assert_eq!(
            strings(&intranet),
            [
                "10.42.0.0/24",
                "10.42.1.0/24",
                "10.43.0.0/16",
                "10.96.0.0/12",
                "10.244.0.0/16",
                "10.250.0.11/32",
                "fd00::11/128"
            ]
        );
        assert!(cluster_intranet(&[], &[], &[], &[]).is_empty());
    }

    #[test]
    fn auto_mtu_per_tunnel_kind_from_the_servers_configuration() {
        use crate::tunnel::{TunnelConfig, openvpn::OpenVpnConfig, wireguard::WireguardConfig};
        let ovpn = |extra: &str| {
            let text = format!("client\ndev tun\nremote 192.0.2.2 1194\n{extra}");
            TunnelConfig::OpenVpn(OpenVpnConfig::from_ovpn(&text, None, "ck0").unwrap())
        };
        let wg = |extra: &str| {
            let key = "wOEI9rqqbDwnN8/Bpp22sVz48T71vJ4fYmFWujulwUU=";
            let text = format!(
                "[Interface]\nPrivateKey = {key}\nAddress = 10.64.0.2/32\n{extra}\n[Peer]\nPublicKey = {key}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n"
            );
            TunnelConfig::WireGuard(WireguardConfig::from_wg_quick(&text, "ck0").unwrap())
        };
        // The table: what each kind's tunnel carries whole (its configured MTU, or its default,
        // within what the exit's network takes with its overhead), and what a client gets
        // (VXLAN takes 50 more), over a 1500-byte pod network and a 1450-byte one (flannel).
        let table = [
            (
                "WireGuard (wg-quick's default 1420)",
                wg(""),
                [1420, 1420],
                [1370, 1370],
            ),
            (
                "WireGuard with MTU 1280",
                wg("MTU = 1280"),
                [1280, 1280],
                [1280, 1280],
            ),
            (
                "OpenVPN (tun-mtu's default 1500)",
                ovpn(""),
                [1428, 1428],
                [1378, 1378],
            ),
            (
                "OpenVPN with tun-mtu 1400",
                ovpn("tun-mtu 1400\n"),
                [1400, 1400],
                [1378, 1378],
            ),
        ];
        for (kind, tunnel, at_1500, at_1450) in table {
            for (pod_network, [fit, client]) in [(1500, at_1500), (1450, at_1450)] {
                let carried = tunnel_fit(&tunnel, pod_network);
                assert_eq!(carried, fit, "{kind} over {pod_network}");
                assert_eq!(
                    auto_mtu(carried, pod_network, false),
                    client,
                    "{kind} over {pod_network}"
                );
            }
        }
    }

    #[test]
    fn a_new_exit_gets_the_lowest_free_vni() {
        assert_eq!(free_vni(&BTreeSet::new()), Some(FIRST_VNI));
        let taken = BTreeSet::from([FIRST_VNI, FIRST_VNI + 2]);
        assert_eq!(free_vni(&taken), Some(FIRST_VNI + 1));
    }

    #[test]
    fn exit_names_are_numbered_after_their_gateway() {
        assert_eq!(exit_name("egress", 0), "egress-exit-0");
    }

    #[test]
    fn an_intranet_that_covers_a_whole_family_is_refused_and_one_that_leaves_any_of_it_is_not() {
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().map(|n| n.parse().unwrap()).collect() };
        assert_eq!(intranet_refusal(&nets(&["10.0.0.0/8", "fd00::/8"])), None);
        assert_eq!(intranet_refusal(&[]), None);
        let whole = intranet_refusal(&nets(&["10.0.0.0/8", "0.0.0.0/0"])).unwrap();
        assert!(whole.contains("every IPv4 address"), "{whole}");
        let halves = intranet_refusal(&nets(&["0.0.0.0/1", "128.0.0.0/1"])).unwrap();
        assert!(
            halves.contains("IPv4") && !halves.contains("IPv6"),
            "{halves}"
        );
        let v6 = intranet_refusal(&nets(&["::/0"])).unwrap();
        assert!(
            v6.contains("every IPv6 address") && !v6.contains("IPv4"),
            "{v6}"
        );
        assert_eq!(intranet_refusal(&nets(&["0.0.0.0/1", "::/1"])), None);
    }
}
