//! `cloak lab status`: what a user checks, as tables — nodes, the operator's leader, providers'
//! slots, masks and their holders, gateways' exits and clients, the exit address each workload is seen with (asked of the
//! echo service's record), and forwarded ports.

use std::{fmt::Write as _, path::Path, time::SystemTime};

use serde_json::Value;

use crate::{
    error::{Error, Result},
    layout::{self, Lab},
    sh,
    supervisor::{self, CLOAK_NAMESPACE},
};

pub(crate) fn render(lab: &Lab, kubectl: &Path) -> Result<String> {
    let mut out = String::new();
    let Some(pid) = supervisor::supervisor_pid(lab) else {
        return Err(Error::Other(format!(
            "lab {} is not running (`cloak lab up`)",
            lab.name()
        )));
    };
    let port = std::fs::read_to_string(lab.dir().join("api-port")).unwrap_or_default();
    let _ = writeln!(
        out,
        "lab {}: supervisor PID {pid}, API https://127.0.0.1:{} (kubeconfig {})",
        lab.name(),
        port.trim(),
        lab.kubeconfig().display()
    );
    if let Ok(port) = std::fs::read_to_string(crate::prometheus::port_file(lab)) {
        let _ = writeln!(
            out,
            "Prometheus http://127.0.0.1:{} (its HTTP API; scrapes every cloak component, the chart's alerts loaded)",
            port.trim()
        );
    }
    out.push('\n');
    let get = |args: &[&str]| -> Result<Vec<Value>> {
        let mut command = lab.kubectl(kubectl);
        command.args(args).args(["-o", "json"]);
        let text = sh::output(&mut command)?;
        let list: Value =
            serde_json::from_str(&text).map_err(|e| Error::Other(format!("{args:?}: {e}")))?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    };

    let nodes = get(&["get", "nodes"])?;
    let pods = get(&["get", "pods", "-A"])?;
    let mut rows = vec![row(&["NODE", "READY", "ADDRESS", "PODS", "VERSION"])];
    for node in &nodes {
        let name = str_at(node, "/metadata/name");
        let address = node["status"]["addresses"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
            .map_or(String::new(), |x| str_at(x, "/address"));
        let count = pods
            .iter()
            .filter(|p| str_at(p, "/spec/nodeName") == name)
            .count();
        rows.push(vec![
            name,
            if supervisor::node_ready(node) {
                "Ready"
            } else {
                "NotReady"
            }
            .into(),
            address,
            count.to_string(),
            str_at(node, "/status/nodeInfo/kubeletVersion"),
        ]);
    }
    table(&mut out, &rows);

    let leases = get(&["-n", CLOAK_NAMESPACE, "get", "leases"]).unwrap_or_default();
    let operators: Vec<&Value> = pods
        .iter()
        .filter(|p| {
            str_at(p, "/metadata/namespace") == CLOAK_NAMESPACE
                && str_at(p, "/metadata/labels/app.kubernetes.io~1name") == "cloak"
                && str_at(p, "/metadata/labels/app.kubernetes.io~1component") != "node"
        })
        .collect();
    let leader = leases
        .iter()
        .find_map(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "(none)".into());
    let mut rows = vec![row(&["OPERATOR POD", "NODE", "READY", "LEADER"])];
    for pod in operators {
        let name = str_at(pod, "/metadata/name");
        rows.push(vec![
            name.clone(),
            str_at(pod, "/spec/nodeName"),
            pod_ready(pod).to_string(),
            if name == leader { "yes" } else { "" }.into(),
        ]);
    }
    table(&mut out, &rows);

    let providers = get(&["get", "vpnproviders", "-A"]).unwrap_or_default();
    let mut rows = vec![row(&["PROVIDER", "PHASE", "SLOTS", "TUNNEL", "MESSAGE"])];
    for p in &providers {
        rows.push(vec![
            namespaced(p),
            str_at(p, "/status/phase"),
            format!(
                "{}/{}",
                p["status"]["activeSlots"].as_u64().unwrap_or(0),
                p["spec"]["maxSlots"].as_u64().unwrap_or(0)
            ),
            str_at(p, "/spec/tunnel"),
            str_at(p, "/status/message"),
        ]);
    }
    table(&mut out, &rows);

    let masks = get(&["get", "vpnmasks", "-A"]).unwrap_or_default();
    let mut rows = vec![row(&["MASK", "PHASE", "PROVIDER", "SLOT", "HOLDER"])];
    for m in &masks {
        let uid = str_at(m, "/metadata/uid");
        let holders: Vec<String> = pods
            .iter()
            .filter(|p| {
                p["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|p| format!("pod/{}", str_at(p, "/metadata/name")))
            .collect();
        rows.push(vec![
            namespaced(m),
            str_at(m, "/status/phase"),
            str_at(m, "/status/provider/name"),
            m["status"]["provider"]["slot"]
                .as_u64()
                .map_or(String::new(), |s| s.to_string()),
            holders.join(","),
        ]);
    }
    table(&mut out, &rows);

    let gateways = get(&["get", "vpngateways", "-A"]).unwrap_or_default();
    let mut rows = vec![row(&[
        "GATEWAY EXIT",
        "NODE",
        "POD IP",
        "PROVIDER",
        "SERVER",
        "PUBLIC ADDRESS",
        "HEALTH",
        "MESSAGE",
    ])];
    for g in &gateways {
        let gateway = namespaced(g);
        for e in g["status"]["exits"].as_array().into_iter().flatten() {
            rows.push(vec![
                format!("{gateway}:{}", str_at(e, "/name")),
                str_at(e, "/node"),
                str_at(e, "/podIp"),
                str_at(e, "/provider"),
                str_at(e, "/server"),
                str_at(e, "/publicAddress"),
                str_at(e, "/health"),
                str_at(e, "/message"),
            ]);
        }
    }
    table(&mut out, &rows);
    // Chains, a row a hop: what each provider sees is the address of the hop before.
    let chains = get(&["get", "vpnchains", "-A"]).unwrap_or_default();
    let mut rows = vec![row(&[
        "CHAIN HOP",
        "PROVIDER",
        "SERVER",
        "PUBLIC ADDRESS",
        "HEALTH",
        "SWITCHES",
    ])];
    for c in &chains {
        let chain = namespaced(c);
        for h in c["status"]["hops"].as_array().into_iter().flatten() {
            rows.push(vec![
                format!("{chain}:{}", h["hop"]),
                str_at(h, "/provider"),
                str_at(h, "/server"),
                str_at(h, "/publicAddress"),
                str_at(h, "/health"),
                h["switches"].as_u64().unwrap_or(0).to_string(),
            ]);
        }
    }
    table(&mut out, &rows);
    // Clients by the gateway label (pods a gateway's `podSelector` adds are not listed here).
    let mut rows = vec![row(&[
        "GATEWAY CLIENT",
        "GATEWAY",
        "NODE",
        "POD IP",
        "PHASE",
    ])];
    for p in &pods {
        let gateway = str_at(p, "/metadata/labels/cloak.dev~1gateway");
        if gateway.is_empty() {
            continue;
        }
        rows.push(vec![
            namespaced(p),
            gateway,
            str_at(p, "/spec/nodeName"),
            str_at(p, "/status/podIP"),
            str_at(p, "/status/phase"),
        ]);
    }
    table(&mut out, &rows);

    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = vec![row(&[
        "WORKLOAD",
        "SEEN FROM (echo service)",
        "EXIT OF",
        "AGO",
    ])];
    for (name, (ip, at)) in crate::echo::seen(&lab.dir().join("echo.json")) {
        let exit_of = layout::PROVIDERS
            .iter()
            .find(|p| p.exit() == ip)
            .map_or_else(|| "(not a VPN exit)".to_owned(), |p| p.name.to_owned());
        rows.push(vec![
            name,
            ip,
            exit_of,
            format!("{}s", now.saturating_sub(at)),
        ]);
    }
    table(&mut out, &rows);

    let services = get(&["get", "services", "-A"]).unwrap_or_default();
    let mut rows = vec![row(&[
        "FORWARDED SERVICE",
        "HOST PORTS (host namespace)",
        "NODE PORTS",
    ])];
    for s in &services {
        let ports = str_at(s, "/metadata/annotations/cloak.dev~1external-ports");
        if ports.is_empty() {
            continue;
        }
        let node_ports: Vec<String> = s["spec"]["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        format!(
                            "{}->{}/{}",
                            p["nodePort"].as_u64().unwrap_or(0),
                            p["port"].as_u64().unwrap_or(0),
                            p["protocol"].as_str().unwrap_or("TCP").to_lowercase()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.push(vec![namespaced(s), ports, node_ports.join(",")]);
    }
    table(&mut out, &rows);
    Ok(out)
}

fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// `namespace/name` of an object.
fn namespaced(v: &Value) -> String {
    format!(
        "{}/{}",
        str_at(v, "/metadata/namespace"),
        str_at(v, "/metadata/name")
    )
}

fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns two spaces apart; a table with only its header says "(none)".
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
        if i == 0 && rows.len() == 1 {
            let _ = writeln!(out, "(none)");
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_say_none_when_empty() {
        let mut out = String::new();
        table(&mut out, &[row(&["A", "BB"]), row(&["long", "x"])]);
        assert_eq!(out, "A     BB\nlong  x\n\n");
        let mut out = String::new();
        table(&mut out, &[row(&["MASK", "PHASE"])]);
        assert_eq!(out, "MASK  PHASE\n(none)\n\n");
    }
}
