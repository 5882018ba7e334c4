//! What a user's Prometheus sees of cloak, asked of the lab's real Prometheus (built from its Go
//! module, scraping through the API server's pod list as a user's would): every cloak
//! component a target that is up, a failover in the counters and in the chart's alert, and every
//! query of the chart's dashboard answered with data.

use std::time::Duration;

use cloak_lab::layout;
use serde_json::Value;

use super::lab;
use lab::gateway::*;
use lab::{eventually, str_at};

/// The lab's Prometheus, on the host's loopback.
struct Prometheus {
    port: u16,
}

impl Prometheus {
    fn of(lab: &lab::TestLab) -> Self {
        let port = std::fs::read_to_string(cloak_lab::prometheus::port_file(&lab.lab))
            .expect("the lab runs a Prometheus (cloak lab status names it)")
            .trim()
            .parse()
            .unwrap();
        Self { port }
    }

    /// `GET path`, the answer's `data` (an error answer is a panic with its text).
    fn api(&self, path: &str) -> Value {
        let (status, body) = cloak_lab::prometheus::get(self.port, path).unwrap();
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status} {e}: {body}"));
        assert_eq!(answer["status"], "success", "GET {path}: {body}");
        answer["data"].clone()
    }

    /// An instant query's series.
    fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// An instant query's series of `gateway` (an alert's expression: the lab's other gateways,
    /// the example chain's hops, may fire too).
    fn of_gateway(&self, promql: &str, gateway: &str) -> Vec<Value> {
        self.query(promql)
            .into_iter()
            .filter(|s| s["metric"]["gateway"] == gateway)
            .collect()
    }

    /// The sum of an instant query's values (0 with no series).
    fn sum(&self, promql: &str) -> f64 {
        self.query(promql)
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    }
}

/// Percent-encodes a query for a URL.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The chart's rules, by alert name: their expressions.
fn alert_expr(name: &str) -> String {
    let rules: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(cloak_testkit::repo_path("charts/cloak/files/alerts.yaml"))
            .unwrap(),
    )
    .unwrap();
    rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == name)
        .and_then(|r| r["expr"].as_str())
        .unwrap_or_else(|| panic!("no alert {name}"))
        .to_owned()
}

#[test]
fn prometheus_scrapes_every_cloak_component_sees_a_failover_fire_its_alert_and_answers_every_dashboard_query()
 {
    let lab = lab::shared();
    let _turn = lab::serial();
    let gw = healthy_gateway(lab);
    let prometheus = Prometheus::of(lab);
    let gateway = str_at(&gw, "/metadata/name");
    // `cloak lab status` says where it is.
    let status = lab::cloak_lab(lab.lab.name(), &["status"]);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        said.contains(&format!("Prometheus http://127.0.0.1:{} ", prometheus.port)),
        "{said}"
    );

    // Every component is a target, and up: the operator's two replicas and a node daemon per
    // node (annotations), both exits (with the metrics reader token), portfwd on the host.
    let targets = eventually(
        "every cloak component an up target",
        Duration::from_mins(2),
        || {
            let active = prometheus.api("/api/v1/targets?state=active")["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let count = |job: &str, component: &str| {
                active
                    .iter()
                    .filter(|t| t["labels"]["job"] == job && t["labels"]["component"] == component)
                    .count()
            };
            let down: Vec<String> = active
                .iter()
                .filter(|t| t["health"] != "up")
                .map(|t| {
                    format!(
                        "{} {}: {}",
                        t["labels"]["job"], t["scrapeUrl"], t["lastError"]
                    )
                })
                .collect();
            let counts = [
                count("cloak", "operator"),
                count("cloak", "node"),
                count("cloak-exits", "exit"),
                count("cloak-portfwd", "portfwd"),
            ];
            if down.is_empty()
                && counts[0] == 2
                && counts[1] == 2
                && counts[2] >= 2
                && counts[3] == 1
            {
                Ok(active)
            } else {
                Err(format!("counts {counts:?}, down {down:?}"))
            }
        },
    );
    eprintln!("{} targets up", targets.len());
    // The scrape's cost: series per component at the lab's size.
    for series in prometheus.query(r#"count by (job, component) ({__name__=~"cloak_.+"})"#) {
        eprintln!(
            "series {} {}: {}",
            series["metric"]["job"], series["metric"]["component"], series["value"][1]
        );
    }
    // The exits' series carry their gateway.
    assert!(
        prometheus.sum(&format!(
            "cloak_agent_exit_healthy{{gateway=\"{gateway}\"}}"
        )) >= 2.0,
        "{:?}",
        prometheus.query("cloak_agent_exit_healthy")
    );

    // A client on the gateway, so both nodes' plans hold its exits.
    let name = "gw-metrics";
    running_client(lab, name);
    let failovers =
        format!("sum(cloak_node_failovers_total{{gateway=\"{gateway}\", reason=\"unanswered\"}})");
    let before = prometheus.sum(&failovers);
    let degraded = alert_expr("CloakGatewayDegraded");
    assert!(
        prometheus.of_gateway(&degraded, &gateway).is_empty(),
        "degraded before anything failed: {:?}",
        prometheus.query(&degraded)
    );

    // One exit's provider goes silent: the nodes stop sending it new flows, the operator marks
    // it unhealthy, and the alert's expression names the gateway (pending: `for: 10m`).
    let exits = gw["status"]["exits"].as_array().unwrap().clone();
    let provider = layout::PROVIDERS
        .iter()
        .find(|p| exit_address(&exits[0]) == p.exit())
        .unwrap();
    let outage = lab::Outage::start(lab, &super::gateway_servers(&[provider]));
    let moved = eventually(
        "the nodes' failover counted",
        Duration::from_mins(2),
        || {
            let now = prometheus.sum(&failovers);
            if now > before {
                Ok(now)
            } else {
                Err(format!("{now} (before {before})"))
            }
        },
    );
    eprintln!("failovers {before} -> {moved}");
    let pending = eventually(
        "the degraded alert pending for the gateway",
        Duration::from_mins(2),
        || {
            let firing = prometheus.query(&format!(
                "ALERTS{{alertname=\"CloakGatewayDegraded\", gateway=\"{gateway}\"}}"
            ));
            if firing.is_empty() {
                Err(format!("{:?}", prometheus.of_gateway(&degraded, &gateway)))
            } else {
                Ok(firing)
            }
        },
    );
    assert_eq!(pending[0]["metric"]["alertstate"], "pending", "{pending:?}");
    let none_healthy = alert_expr("CloakGatewayNoHealthyExit");
    assert!(
        prometheus.of_gateway(&none_healthy, &gateway).is_empty(),
        "one exit is still healthy: {:?}",
        prometheus.query(&none_healthy)
    );

    // Every query of the dashboard returns data now.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(cloak_testkit::repo_path(
            "charts/cloak/files/dashboard.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let query = target["expr"].as_str().unwrap();
            if prometheus.query(query).is_empty() {
                empty.push(format!("{}: {query}", panel["title"]));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries with no data: {empty:#?}"
    );

    drop(outage);
    healthy_gateway(lab);
    eventually("the degraded alert gone", Duration::from_mins(3), || {
        let mut left = prometheus.of_gateway(&degraded, &gateway);
        left.extend(prometheus.of_gateway(r#"ALERTS{alertname="CloakGatewayDegraded"}"#, &gateway));
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    delete_client(lab, name);
}
