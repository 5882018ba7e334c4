//! Inbound ports through the example gateway's exits: the lab's fake providers run a NAT-PMP
//! gateway (`cloak_lab::natpmp`) that forwards its exit address's ports into the tunnels, each
//! exit asks for its ports and sends what arrives to the example Service `web`
//! (`examples/lab/40-portfwd.yaml`: HTTP on port 80, a UDP echo on 5353), and a remote client in
//! the lab's internet connects.

use std::{fmt::Write as _, time::Duration};

use cloak_lab::{DEMO_NAMESPACE, layout, natpmp};
use serde_json::Value;

use super::lab;
use lab::gateway::*;
use lab::{eventually, str_at};

/// `spec.ports` on the example gateway, removed (and the providers' gateways put back) when
/// dropped.
struct Ports<'a> {
    lab: &'a lab::TestLab,
}

/// Removes `spec.ports` from the example gateway.
fn clear_ports(lab: &lab::TestLab) -> Result<String, String> {
    set_ports(lab, "null")
}

/// Sets the example gateway's `spec.ports` to `ports` (JSON).
fn set_ports(lab: &lab::TestLab, ports: &str) -> Result<String, String> {
    patch_spec(lab, &format!(r#"{{"ports":{ports}}}"#))
}

impl Drop for Ports<'_> {
    fn drop(&mut self) {
        let _ = clear_ports(self.lab);
        for p in layout::PROVIDERS.iter().filter(|p| !p.gluetun) {
            let _ = natpmp::control(&self.lab.lab, p, natpmp::Control::default());
        }
    }
}

/// Each exit's (public address, forwarded ports by `name/PROTO`) once every exit has both
/// requests mapped and `accept` says yes.
fn mapped(
    lab: &lab::TestLab,
    what: &str,
    limit: Duration,
    accept: impl Fn(&[(String, Vec<(String, u64)>)]) -> bool,
) -> Vec<(String, Vec<(String, u64)>)> {
    eventually(what, limit, || {
        let gw = gateway(lab);
        let exits: Vec<(String, Vec<(String, u64)>)> = gw["status"]["exits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let ports = e["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        (
                            format!("{}/{}", str_at(p, "/name"), str_at(p, "/protocol")),
                            p["port"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                (str_at(e, "/publicAddress"), ports)
            })
            .collect();
        let whole = exits.len() == 2
            && exits.iter().all(|(address, ports)| {
                !address.is_empty()
                    && ports.iter().any(|(k, _)| k == "http/TCP")
                    && ports.iter().any(|(k, _)| k == "echo/UDP")
            });
        if whole && accept(&exits) {
            Ok(exits)
        } else {
            Err(gw["status"]["exits"].to_string())
        }
    })
}

fn port_of(ports: &[(String, u64)], key: &str) -> u64 {
    ports.iter().find(|(k, _)| k == key).map_or(0, |(_, p)| *p)
}

/// The web page at `address:port`, from the lab's internet.
fn page(lab: &lab::TestLab, address: &str, port: u64) -> Result<String, String> {
    lab.exec_in(
        "net",
        &[
            "curl",
            "-s",
            "-m",
            "3",
            &format!("http://{address}:{port}/"),
        ],
    )
}

/// One UDP exchange with `address:port`, from the lab's internet.
fn udp(lab: &lab::TestLab, address: &str, port: u64, payload: &str) -> Result<String, String> {
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\ns.sendto(b'{payload}',('{address}',{port}))\nprint(s.recvfrom(200)[0].decode())\n"
    );
    lab.exec_in("net", &["python3", "-c", &script])
        .map(|s| s.trim().to_owned())
}

/// A remote's UDP flows to the given `address:port`s, one datagram to each every 0.2 s for
/// `seconds`, from the lab's internet.
struct UdpFlows(std::process::Child);

impl UdpFlows {
    fn start(lab: &lab::TestLab, targets: &[(String, u64)], seconds: u64) -> Self {
        let targets: Vec<String> = targets
            .iter()
            .map(|(a, p)| format!("('{a}',{p})"))
            .collect();
        let script = format!(
            "import socket,time,json\n\
             targets=[{targets}]\n\
             socks=[]\n\
             for t in targets:\n  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(0.1); s.connect(t); socks.append(s)\n\
             start=time.time(); res=[[0,0.0,start] for t in targets]\n\
             while time.time()<start+{seconds}:\n  for i,s in enumerate(socks):\n    try:\n      s.send(b'x'); s.recv(100); now=time.time(); r=res[i]; r[1]=max(r[1],now-r[2]); r[2]=now; r[0]+=1\n    except Exception: pass\n  time.sleep(0.2)\n\
             end=time.time()\n\
             print(json.dumps([[r[0],max(r[1],end-r[2])] for r in res]))\n",
            targets = targets.join(",")
        );
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.netns("net"), "python3", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// Per target: answers, and the longest time without one (s).
    fn results(self) -> Vec<(u64, f64)> {
        let out = self.0.wait_with_output().unwrap();
        let parsed: Vec<(u64, f64)> = serde_json::from_slice(&out.stdout).unwrap();
        parsed
    }
}

/// An exit's `/metrics`, asked from its node with the gateway's admin token.
fn exit_metrics(lab: &lab::TestLab, exit: &Value) -> String {
    let token = lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "secret",
        "egress-exit-admin",
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    let url = format!(
        "http://{}:{}/metrics",
        str_at(exit, "/podIp"),
        cloak_model::exit::ADMIN_PORT
    );
    lab.exec_in(
        &str_at(exit, "/node"),
        &[
            "curl",
            "-s",
            "-m",
            "3",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            &url,
        ],
    )
    .unwrap()
}

/// The value of the first metric line starting with `line`; 0 without one.
fn metric(metrics: &str, line: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

fn provider_of(address: &str) -> &'static layout::Provider {
    layout::PROVIDERS
        .iter()
        .find(|p| p.exit() == address)
        .unwrap()
}

#[test]
fn provider_forwarded_ports_reach_the_service_through_every_exit_follow_changes_and_resets_and_are_released()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_gateway(lab);
    let started = std::time::Instant::now();
    set_ports(
        lab,
        r#"[{"name":"http","service":"web","port":80,"protocol":"TCP"},{"name":"echo","service":"web","port":5353,"protocol":"UDP"}]"#,
    )
    .unwrap();
    let _ports = Ports { lab };
    let exits = mapped(
        lab,
        "both exits publish both ports",
        Duration::from_mins(2),
        |_| true,
    );
    eprintln!("ports published {:?} after the request", started.elapsed());

    // A remote client reaches the Service through each exit's forwarded address, TCP and UDP.
    for (address, ports) in &exits {
        let http = port_of(ports, "http/TCP");
        let body = eventually(
            &format!("http through {address}:{http}"),
            Duration::from_secs(30),
            || page(lab, address, http),
        );
        assert_eq!(body.trim(), "hello from the cloak lab");
        let echo = port_of(ports, "echo/UDP");
        let echoed = eventually(
            &format!("udp through {address}:{echo}"),
            Duration::from_secs(30),
            || udp(lab, address, echo, "inbound"),
        );
        assert_eq!(echoed, "inbound");
    }

    // Each exit counts what it took and what it holds (its /metrics, with the gateway's token,
    // from its node).
    for exit in gateway(lab)["status"]["exits"].as_array().unwrap() {
        let metrics = exit_metrics(lab, exit);
        assert!(
            metric(
                &metrics,
                "cloak_agent_inbound_connections_total{name=\"http\",protocol=\"tcp\"}"
            ) >= 1,
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, "cloak_agent_inbound_mappings "),
            2,
            "{metrics}"
        );
        assert!(
            metric(&metrics, "cloak_agent_inbound_renewals_total") >= 2,
            "{metrics}"
        );
    }

    // Published where applications read it: the ConfigMap and the Service's annotation.
    let cm = lab.json(&["-n", DEMO_NAMESPACE, "get", "configmap", "egress-ports"]);
    let service = lab.json(&["-n", DEMO_NAMESPACE, "get", "service", "web"]);
    let annotation = str_at(&service, "/metadata/annotations/cloak.dev~1forwarded-ports");
    for (address, ports) in &exits {
        let http = format!("{address}:{}/tcp", port_of(ports, "http/TCP"));
        assert!(str_at(&cm, "/data/http").contains(&http), "{cm}");
        assert!(annotation.contains(&http), "{annotation}");
        let echo = format!("{address}:{}/udp", port_of(ports, "echo/UDP"));
        assert!(str_at(&cm, "/data/echo").contains(&echo), "{cm}");
    }

    // Only what comes by the tunnel is sent on: the Service's port on the exit pod's own
    // address (the pod network) leads nowhere.
    for exit in gateway(lab)["status"]["exits"].as_array().unwrap() {
        let url = format!("http://{}:80/", str_at(exit, "/podIp"));
        let node = str_at(exit, "/node");
        assert!(
            lab.exec_in(&node, &["curl", "-s", "-m", "3", &url])
                .is_err(),
            "the exit's pod address sent port 80 on: {exit}"
        );
    }

    // Nothing is open on a node's uplink: the same port on a node's address is closed.
    let (_, first_ports) = &exits[0];
    let http = port_of(first_ports, "http/TCP");
    for k in 1..=2 {
        assert!(
            page(lab, &layout::node_ip(k), http).is_err(),
            "port {http} answered on node {k}"
        );
    }

    // The provider gives the first exit's mappings new ports: published within a renewal.
    let (address, before) = exits[0].clone();
    let provider = provider_of(&address);
    let old_http = port_of(&before, "http/TCP");
    natpmp::control(
        &lab.lab,
        provider,
        natpmp::Control {
            moves: 1,
            ..natpmp::Control::default()
        },
    )
    .unwrap();
    let moved_at = std::time::Instant::now();
    let moved = mapped(
        lab,
        "the new port published",
        Duration::from_mins(1),
        |exits| {
            exits.iter().any(|(a, p)| {
                *a == address && port_of(p, "http/TCP") != old_http && port_of(p, "http/TCP") != 0
            })
        },
    );
    eprintln!("a changed port was published in {:?}", moved_at.elapsed());
    let new_http = moved
        .iter()
        .find(|(a, _)| *a == address)
        .map(|(_, p)| port_of(p, "http/TCP"))
        .unwrap();
    let body = eventually("http through the new port", Duration::from_secs(30), || {
        page(lab, &address, new_http)
    });
    assert_eq!(body.trim(), "hello from the cloak lab");
    let annotation = eventually("the annotation follows", Duration::from_secs(15), || {
        let service = lab.json(&["-n", DEMO_NAMESPACE, "get", "service", "web"]);
        let a = str_at(&service, "/metadata/annotations/cloak.dev~1forwarded-ports");
        if a.contains(&format!("{address}:{new_http}/tcp")) {
            Ok(a)
        } else {
            Err(a)
        }
    });
    assert!(!annotation.contains(&format!("{address}:{old_http}/tcp")));

    // The provider's gateway restarts and loses every mapping: the exit sees its epoch go back
    // at its next renewal and asks for every mapping at once.
    let log = natpmp::log_file(&lab.lab, provider);
    let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();
    natpmp::control(
        &lab.lab,
        provider,
        natpmp::Control {
            moves: 1,
            resets: 1,
            ..natpmp::Control::default()
        },
    )
    .unwrap();
    let recreated = eventually(
        "every mapping asked again after the reset",
        Duration::from_mins(1),
        || {
            let text = std::fs::read_to_string(&log).unwrap();
            let after: Vec<&str> = text.lines().skip(lines_before).collect();
            let reset = after.iter().position(|l| l.contains("reset:"));
            let Some(reset) = reset else {
                return Err("no reset yet".to_owned());
            };
            // Both of this exit's mappings (TCP and UDP), granted after the reset.
            let granted: Vec<&&str> = after[reset..]
                .iter()
                .filter(|l| l.contains("Success") && l.contains("lifetime: 60"))
                .collect();
            let tcp = granted.iter().any(|l| l.contains("Tcp"));
            let udp = granted.iter().any(|l| l.contains("Udp"));
            if tcp && udp {
                Ok(after.join("\n"))
            } else {
                Err(after.join("\n"))
            }
        },
    );
    // The exit saw its gateway's epoch go back (not only its regular renewal).
    let lost_exit = gateway(lab)["status"]["exits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| str_at(e, "/publicAddress") == address)
        .cloned()
        .unwrap();
    let resets = metric(
        &exit_metrics(lab, &lost_exit),
        "cloak_agent_inbound_epoch_resets_total",
    );
    assert!(resets >= 1, "no epoch reset seen by the exit");
    let still = eventually(
        "the exit carries its ports again",
        Duration::from_secs(30),
        || page(lab, &address, new_http),
    );
    assert_eq!(still.trim(), "hello from the cloak lab", "{recreated}");

    // The other exit's pod is killed: its replacement (on its pool's next server) asks for its
    // own ports, published as soon as it is healthy.
    let (other_address, _) = exits[1].clone();
    let gw = gateway(lab);
    let other = gw["status"]["exits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| str_at(e, "/publicAddress") == other_address)
        .cloned()
        .unwrap();
    let (other_name, other_server) = (str_at(&other, "/name"), str_at(&other, "/server"));
    // A remote keeps a UDP flow going through each exit meanwhile: killing one exit costs
    // only its own.
    let echo_ports: Vec<(String, u64)> =
        mapped(lab, "both exits mapped", Duration::from_mins(1), |_| true)
            .into_iter()
            .map(|(a, p)| {
                let port = port_of(&p, "echo/UDP");
                (a, port)
            })
            .collect();
    let flows = UdpFlows::start(lab, &echo_ports, 15);
    std::thread::sleep(Duration::from_secs(3));
    lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "delete",
        "pod",
        &other_name,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    let mut healthy_at = None;
    let published_after = eventually(
        "the replaced exit's ports published",
        Duration::from_mins(3),
        || {
            let gw = gateway(lab);
            let exit = exit_named(&gw, &other_name);
            let replaced = str_at(&exit, "/server") != other_server && exit["health"] == "Healthy";
            if replaced && healthy_at.is_none() {
                healthy_at = Some(std::time::Instant::now());
            }
            let ports = exit["ports"].as_array().map_or(0, Vec::len);
            match healthy_at {
                Some(at) if replaced && ports == 2 => Ok(at.elapsed()),
                _ => Err(exit.to_string()),
            }
        },
    );
    let seen = k8s_openapi::jiff::Timestamp::now();
    if published_after > Duration::from_secs(3) {
        // Slower than its target: what the exit did meanwhile.
        eprintln!(
            "{}",
            lab.try_kubectl(&["-n", DEMO_NAMESPACE, "logs", &other_name])
                .unwrap_or_default()
        );
    }
    let flows = flows.results();
    for ((a, _), (answered, gap)) in echo_ports.iter().zip(&flows) {
        if *a == other_address {
            // Answered until its pod went (2-3 s of the 15), then not.
            assert!(*gap > 5.0, "the killed exit's flow went on: {flows:?}");
        } else {
            assert!(
                *gap < 1.5 && *answered > 40,
                "the surviving exit's flow was hurt: {flows:?}"
            );
        }
    }
    // From the new pod's Ready (the kubelet's clock, to the second) to the ports seen.
    let pod = lab.json(&["-n", DEMO_NAMESPACE, "get", "pod", &other_name]);
    let ready_at: k8s_openapi::jiff::Timestamp = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .map(|c| str_at(c, "/lastTransitionTime"))
        .unwrap_or_default()
        .parse()
        .unwrap();
    eprintln!(
        "a replaced exit's ports were seen published {:.1} s after its pod was Ready \
         (the Ready time to the second; {published_after:?} after the test saw it healthy)",
        seen.duration_since(ready_at).as_secs_f64()
    );

    // The request removed: the exits release their mappings (the fake gateway sees lifetime 0).
    let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();
    clear_ports(lab).unwrap();
    let cleared = std::time::Instant::now();
    eventually("the mappings released", Duration::from_mins(2), || {
        let text = std::fs::read_to_string(&log).unwrap();
        let released = text
            .lines()
            .skip(lines_before)
            .filter(|l| l.contains("lifetime: 0 })"))
            .count();
        if released >= 2 {
            return Ok(());
        }
        let mut seen = text
            .lines()
            .skip(lines_before)
            .collect::<Vec<_>>()
            .join("\n");
        // The last look: what the exits said meanwhile.
        if cleared.elapsed() > Duration::from_secs(110) {
            for exit in gateway(lab)["status"]["exits"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let logs = lab
                    .try_kubectl(&["-n", DEMO_NAMESPACE, "logs", &str_at(exit, "/name")])
                    .unwrap_or_else(|e| e);
                let _ = write!(seen, "\n--- {}:\n{logs}", str_at(exit, "/name"));
            }
        }
        Err(seen)
    });
    let gw: Value = gateway(lab);
    assert!(
        gw["status"]["exits"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e.get("ports").is_none()),
        "{}",
        gw["status"]
    );
}

/// A Service whose every backend is a client of the gateway: an exit sends the remote's
/// connections to the backends over the links, unmasqueraded, and their replies go back
/// through the exit each came by.
#[test]
fn backends_that_are_clients_of_the_gateway_see_the_remotes_own_address_through_every_exit() {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_gateway(lab);
    // Two backends, clients of the gateway, each answering with the address it saw.
    lab.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: seen
  namespace: {DEMO_NAMESPACE}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: seen}}
  template:
    metadata:
      labels: {{app: seen, cloak.dev/gateway: {GATEWAY}}}
    spec:
      terminationGracePeriodSeconds: 1
      # One on each node: the exits reach both nodes' links.
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector: {{matchLabels: {{app: seen}}}}
      containers:
        - name: web
          image: cloak.dev/lab/client:dev
          imagePullPolicy: Never
          command:
            - sh
            - -c
            - |
              mkdir -p /www/cgi-bin
              printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "seen from $REMOTE_ADDR by $(hostname)"\n' > /www/cgi-bin/ip
              chmod +x /www/cgi-bin/ip
              exec httpd -f -p 8080 -h /www
          ports: [{{name: http, containerPort: 8080}}]
          readinessProbe:
            tcpSocket: {{port: 8080}}
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: seen
  namespace: {DEMO_NAMESPACE}
spec:
  selector: {{app: seen}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    ));
    let _cleanup = Seen { lab };
    lab.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "rollout",
        "status",
        "deployment/seen",
        "--timeout=120s",
    ]);
    set_ports(
        lab,
        r#"[{"name":"seen","service":"seen","port":80,"protocol":"TCP"}]"#,
    )
    .unwrap();
    let _ports = Ports { lab };

    // Each exit is told the two backends, by the pods' own addresses and their nodes.
    let pods = lab.json(&["-n", DEMO_NAMESPACE, "get", "pods", "-l", "app=seen"]);
    let mut pod_ips: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| str_at(p, "/status/podIP"))
        .collect();
    pod_ips.sort();
    let told = eventually(
        "the exits told the backends",
        Duration::from_mins(1),
        || {
            let cm = lab.json(&[
                "-n",
                DEMO_NAMESPACE,
                "get",
                "configmap",
                &format!("{GATEWAY}-exits"),
            ]);
            let text = cm["data"].to_string();
            if pod_ips
                .iter()
                .all(|ip| text.contains(&format!("{ip}:8080")))
            {
                Ok(text)
            } else {
                Err(text)
            }
        },
    );
    // On two nodes: two transit addresses.
    let transits: std::collections::BTreeSet<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let host: std::net::Ipv4Addr = str_at(p, "/status/hostIP").parse().unwrap();
            cloak_model::gateway::transit_for(host).to_string()
        })
        .collect();
    assert_eq!(transits.len(), 2, "{transits:?}");
    for transit in &transits {
        assert!(told.contains(transit.as_str()), "{transit}: {told}");
    }

    // Both exits' forwarded ports.
    let exits: Vec<(String, u64)> = eventually(
        "both exits publish the port",
        Duration::from_mins(2),
        || {
            let gw = gateway(lab);
            let exits: Vec<(String, u64)> = gw["status"]["exits"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let port = e["ports"]
                        .as_array()?
                        .iter()
                        .find(|p| p["name"] == "seen")?["port"]
                        .as_u64()?;
                    Some((str_at(e, "/publicAddress"), port))
                })
                .filter(|(a, p)| !a.is_empty() && *p != 0)
                .collect();
            if exits.len() == 2 {
                Ok(exits)
            } else {
                Err(gw["status"]["exits"].to_string())
            }
        },
    );
    // The remote: the lab internet's own address toward each exit.
    let mut answered_by = std::collections::BTreeSet::new();
    for (address, port) in &exits {
        let route = lab
            .exec_in("net", &["ip", "-4", "route", "get", address])
            .unwrap();
        let remote = route
            .split_whitespace()
            .skip_while(|w| *w != "src")
            .nth(1)
            .unwrap()
            .to_owned();
        // Several connections, so both backends (on their nodes) answer some.
        let mut seen = Vec::new();
        for _ in 0..6 {
            let body = eventually(
                &format!("a connection through {address}:{port}"),
                Duration::from_secs(30),
                || {
                    lab.exec_in(
                        "net",
                        &[
                            "curl",
                            "-s",
                            "-m",
                            "3",
                            &format!("http://{address}:{port}/cgi-bin/ip"),
                        ],
                    )
                    .and_then(|b| {
                        if b.contains("seen from") {
                            Ok(b)
                        } else {
                            Err(b)
                        }
                    })
                },
            );
            // busybox's httpd listens on IPv6 and writes an IPv4 peer as `[::ffff:a.b.c.d]`.
            seen.push(body.trim().replace("[::ffff:", "").replace(']', ""));
        }
        assert!(
            seen.iter()
                .all(|b| b.starts_with(&format!("seen from {remote} by "))),
            "through {address}: {seen:?} (the remote is {remote})"
        );
        answered_by.extend(
            seen.iter()
                .filter_map(|b| b.split(" by ").nth(1).map(str::to_owned)),
        );
    }
    // Twelve connections, each to one of the two backends at random: both answered (all
    // twelve to one would come once in 2,048 runs).
    assert_eq!(answered_by.len(), 2, "{answered_by:?}");

    // One more pod of the Service that is no client: the Service's address again, masqueraded
    // (the pods see the exit pod's address).
    lab.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: seen-plain
  namespace: {DEMO_NAMESPACE}
  labels: {{app: seen}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: web
      image: cloak.dev/lab/client:dev
      imagePullPolicy: Never
      command: [sleep, "100000"]
"#
    ));
    let (address, port) = &exits[0];
    eventually(
        "the connections masqueraded once a pod of the Service is no client",
        Duration::from_mins(1),
        || {
            let body = lab.exec_in(
                "net",
                &[
                    "curl",
                    "-s",
                    "-m",
                    "3",
                    &format!("http://{address}:{port}/cgi-bin/ip"),
                ],
            )?;
            if body.contains("seen from 10.244.") || body.contains("seen from [::ffff:10.244.") {
                Ok(body)
            } else {
                Err(body)
            }
        },
    );
}

/// Removes the backends of the test above.
struct Seen<'a> {
    lab: &'a lab::TestLab,
}

impl Drop for Seen<'_> {
    fn drop(&mut self) {
        for (kind, name) in [
            ("deployment", "seen"),
            ("service", "seen"),
            ("pod", "seen-plain"),
        ] {
            let _ = self.lab.try_kubectl(&[
                "-n",
                DEMO_NAMESPACE,
                "delete",
                kind,
                name,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

/// The gateway's condition `type`, as (status, message).
fn condition(gateway: &Value, type_: &str) -> (String, String) {
    gateway["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| (str_at(c, "/status"), str_at(c, "/message")))
        .unwrap_or_default()
}

/// A provider that refuses to forward a port: the gateway says which exit and which port, and
/// why; once the provider gives in, the exits' next try maps it and the condition clears.
#[test]
fn a_provider_that_refuses_a_port_is_told_in_the_gateways_condition_and_asked_again() {
    let lab = lab::shared();
    let _turn = lab::serial();
    healthy_gateway(lab);
    let _ports = Ports { lab };
    let refusing = natpmp::Control {
        refuse: true,
        ..natpmp::Control::default()
    };
    for p in layout::PROVIDERS.iter().filter(|p| !p.gluetun) {
        natpmp::control(&lab.lab, p, refusing).unwrap();
    }
    set_ports(
        lab,
        r#"[{"name":"http","service":"web","port":80,"protocol":"TCP"}]"#,
    )
    .unwrap();
    let refused = eventually(
        "the refusal in the condition PortsForwarded",
        Duration::from_mins(2),
        || {
            let gw = gateway(lab);
            let (status, message) = condition(&gw, "PortsForwarded");
            let exits = gw["status"]["exits"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let both = exits.len() == 2
                && exits
                    .iter()
                    .all(|e| message.contains(&format!("{}: http/TCP: ", str_at(e, "/name"))));
            if status == "False" && both && message.contains("not authorized") {
                Ok(message)
            } else {
                Err(format!("{status}: {message}"))
            }
        },
    );
    // Nothing is published while refused.
    let gw = gateway(lab);
    assert!(
        gw["status"]["exits"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e.get("ports").is_none()),
        "{refused}: {}",
        gw["status"]["exits"]
    );
    for p in layout::PROVIDERS.iter().filter(|p| !p.gluetun) {
        natpmp::control(&lab.lab, p, natpmp::Control::default()).unwrap();
    }
    eventually(
        "the port mapped and the condition clear once the provider gives in",
        Duration::from_mins(1),
        || {
            let gw = gateway(lab);
            let (status, message) = condition(&gw, "PortsForwarded");
            let exits = gw["status"]["exits"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mapped = exits.len() == 2
                && exits
                    .iter()
                    .all(|e| e["ports"].as_array().is_some_and(|p| !p.is_empty()));
            if status == "True" && mapped {
                Ok(())
            } else {
                Err(format!("{status}: {message}; {}", gw["status"]["exits"]))
            }
        },
    );
}

/// Static ports, as a provider's account page sets them up (AirVPN, Windscribe): each exit's
/// own (the request's list, exit-0 first) is forwarded by its provider with nothing asked of
/// NAT-PMP, published, and reaches the Service.
#[test]
fn static_ports_reach_the_service_through_each_exit_with_nothing_asked() {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let _ports = Ports { lab };
    let mut exits: Vec<(String, String, String)> = gw["status"]["exits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                str_at(e, "/name"),
                str_at(e, "/publicAddress"),
                str_at(e, "/server"),
            )
        })
        .collect();
    exits.sort();
    let mut logs = Vec::new();
    for (i, (_, address, server)) in exits.iter().enumerate() {
        let provider = provider_of(address);
        // The exit's tunnel address at its server: `.2` of that server's subnet.
        let k: u8 = server
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|d| !d.is_empty())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no server number in {server:?}"));
        let client = format!("{}.2", provider.tunnel_prefix(k)).parse().unwrap();
        natpmp::control(
            &lab.lab,
            provider,
            natpmp::Control {
                static_port: Some((client, 41_001 + u16::try_from(i).unwrap())),
                ..natpmp::Control::default()
            },
        )
        .unwrap();
        let log = natpmp::log_file(&lab.lab, provider);
        let seen = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        logs.push((log, seen));
    }
    set_ports(
        lab,
        r#"[{"name":"http","service":"web","port":80,"protocol":"TCP","static":[41001,41002]}]"#,
    )
    .unwrap();
    for (i, (name, address, _)) in exits.iter().enumerate() {
        let port = 41_001 + u64::try_from(i).unwrap();
        eventually(
            &format!("{name} publishes its static port {port}"),
            Duration::from_mins(2),
            || {
                let gw = gateway(lab);
                let exit = exit_named(&gw, name);
                let published = exit["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == "http" && p["port"].as_u64() == Some(port));
                if published {
                    Ok(())
                } else {
                    Err(exit.to_string())
                }
            },
        );
        let body = eventually(
            &format!("http through {address}:{port}"),
            Duration::from_secs(30),
            || page(lab, address, port),
        );
        assert_eq!(body.trim(), "hello from the cloak lab");
    }
    // Nothing was asked of the providers' NAT-PMP gateways for it.
    for (log, seen) in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let asked: Vec<&str> = text
            .lines()
            .skip(seen)
            .filter(|l| l.contains("Map(Map") && l.contains("internal: 4100"))
            .collect();
        assert!(asked.is_empty(), "{asked:?}");
    }
}
