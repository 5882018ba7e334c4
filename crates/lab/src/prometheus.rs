//! A real Prometheus in the lab (built from its Go module by `tools/build-prometheus.sh`),
//! scraping every cloak component as a user's Prometheus would, with the chart's alert rules
//! loaded:
//!
//! - `cloak`: pods annotated `prometheus.io/scrape` (the operator, `cloak node` on every node),
//!   found through the API server (`kubernetes_sd_configs`, role `pod`);
//! - `cloak-exits`: gateway exits in every namespace, with the metrics reader token the chart
//!   made (an exit's `/metrics` answers nothing else);
//! - `cloak-portfwd`: `cloak portfwd` on the lab's host.
//!
//! It runs in node 1's network namespace: the nodes' addresses are in every gateway's intranet,
//! so exits answer it outside their tunnels (from the control plane's address they would not),
//! and it reaches the pods as a kubelet's probes do. It listens on that namespace's loopback,
//! and on the host's loopback through a proxy (`cloak lab status` says where).

use std::{fs, path::Path};

use crate::{
    error::{Error, Result},
    layout::{self, Lab},
    procs::Procs,
    sh,
};

/// Where Prometheus listens inside node 1's namespace.
const LISTEN: (&str, u16) = ("127.0.0.1", 9090);
/// How often it scrapes and evaluates the rules: fast, so a test sees a failover within seconds.
const INTERVAL: &str = "5s";

/// The file holding the port of Prometheus on the host's loopback.
pub fn port_file(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("prometheus-port")
}

/// Applies the prometheus-operator's PodMonitor and PrometheusRule CRDs (`<dir>/crds`), so the
/// chart's monitoring objects are installed against their real schemas.
pub(crate) fn install_crds(lab: &Lab, kubectl: &Path, dir: &Path) -> Result<()> {
    let crds = dir.join("crds");
    let mut apply = lab.kubectl(kubectl);
    apply
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crds);
    sh::output(&mut apply)?;
    let mut wait = lab.kubectl(kubectl);
    wait.args([
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/podmonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);
    sh::output(&mut wait).map(drop)
}

/// Starts Prometheus (`<dir>/prometheus`) with the chart's rules (`<chart>/files/alerts.yaml`)
/// and waits until it is ready. `token` is the chart's metrics reader token.
pub(crate) fn start(
    lab: &Lab,
    procs: &mut Procs,
    dir: &Path,
    chart: &Path,
    token: &str,
) -> Result<u16> {
    let home = lab.dir().join("prometheus");
    fs::create_dir_all(home.join("data")).map_err(Error::io(&home))?;
    let token_file = home.join("metrics-token");
    crate::certs::write_private(&token_file, token)?;
    let rules = home.join("alerts.yaml");
    let chart_rules = chart.join("files/alerts.yaml");
    fs::copy(&chart_rules, &rules).map_err(Error::io(&chart_rules))?;
    let config = home.join("prometheus.yml");
    fs::write(
        &config,
        config_yaml(
            &crate::cluster::cluster_kubeconfig(lab),
            &token_file,
            &rules,
        ),
    )
    .map_err(Error::io(&config))?;
    let node = lab.netns(&layout::node_name(1));
    procs.spawn(
        "prometheus",
        &sh::in_netns(
            &node,
            [
                dir.join("prometheus").to_string_lossy().into_owned(),
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", home.join("data").display()),
                format!("--web.listen-address={}:{}", LISTEN.0, LISTEN.1),
                "--storage.tsdb.retention.time=1d".into(),
                "--log.level=warn".into(),
            ],
        ),
        Some(&home),
    )?;
    let port = crate::proxy::to(
        &format!("/var/run/netns/{node}"),
        0,
        (LISTEN.0.to_owned(), LISTEN.1),
    )?;
    fs::write(port_file(lab), port.to_string()).map_err(Error::io(port_file(lab)))?;
    wait_ready(port)?;
    Ok(port)
}

/// Polls `/-/ready` for up to 60 s.
fn wait_ready(port: u16) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    loop {
        if get(port, "/-/ready").is_ok_and(|(status, _)| status == 200) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Other(
                "Prometheus was not ready within 60 s (logs/prometheus.log)".into(),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// `GET path` from Prometheus on the host's loopback: status code and body.
pub fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {answer:.80}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The scrape configuration, the chart's PodMonitors' jobs written out: `cloak` is the
/// operator and the node daemons in cloak's own namespace (their `namespace` label, a gateway's
/// or a provider's, honoured: tenants cannot make pods there); `cloak-exits` the exits of every
/// namespace, whose labels are the tenant's to set, so none is honoured and only the agent's own
/// series are kept.
fn config_yaml(kubeconfig: &Path, token: &Path, rules: &Path) -> String {
    format!(
        r#"global:
  scrape_interval: {INTERVAL}
  scrape_timeout: 4s
  evaluation_interval: {INTERVAL}
rule_files:
  - {rules}
scrape_configs:
  - job_name: cloak
    honor_labels: true
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: {kubeconfig}
        namespaces:
          names: [{namespace}]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape, __meta_kubernetes_pod_label_app_kubernetes_io_component]
        regex: "true;(operator|node)"
        action: keep
      - source_labels: [__meta_kubernetes_pod_phase]
        regex: Running
        action: keep
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        regex: '([^:]+)(?::\d+)?;(\d+)'
        replacement: '$1:$2'
        target_label: __address__
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        regex: (.+)
        target_label: __metrics_path__
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
        target_label: component
  - job_name: cloak-exits
    authorization:
      type: Bearer
      credentials_file: {token}
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: {kubeconfig}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_managed_by, __meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_container_port_name]
        regex: cloak;exit;admin
        action: keep
      - source_labels: [__meta_kubernetes_pod_phase]
        regex: Running
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_label_cloak_dev_exit_of]
        target_label: gateway
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
        target_label: component
    metric_relabel_configs:
      - source_labels: [__name__]
        regex: cloak_agent_.+
        action: keep
  - job_name: cloak-portfwd
    static_configs:
      - targets: ['{host}:{portfwd}']
        labels: {{component: portfwd}}
"#,
        rules = rules.display(),
        kubeconfig = kubeconfig.display(),
        token = token.display(),
        host = layout::HOST,
        namespace = crate::CLOAK_NAMESPACE,
        portfwd = PORTFWD_ADMIN_PORT,
    )
}

/// `cloak portfwd`'s admin port on the lab's host (its lan address).
pub(crate) const PORTFWD_ADMIN_PORT: u16 = 8081;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrape_configuration_is_yaml_with_the_three_jobs() {
        let text = config_yaml(
            Path::new("/lab/cluster.kubeconfig"),
            Path::new("/lab/prometheus/metrics-token"),
            Path::new("/lab/prometheus/alerts.yaml"),
        );
        let config: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let jobs: Vec<&str> = config["scrape_configs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_name"].as_str().unwrap())
            .collect();
        assert_eq!(jobs, ["cloak", "cloak-exits", "cloak-portfwd"]);
        let cloak = &config["scrape_configs"][0];
        assert_eq!(
            cloak["kubernetes_sd_configs"][0]["namespaces"]["names"][0],
            "cloak-system"
        );
        assert_eq!(cloak["honor_labels"], true);
        let exits = &config["scrape_configs"][1];
        assert!(exits["honor_labels"].is_null(), "tenants' labels honoured");
        assert_eq!(
            exits["metric_relabel_configs"][0]["regex"],
            "cloak_agent_.+"
        );
        assert_eq!(
            exits["authorization"]["credentials_file"],
            "/lab/prometheus/metrics-token"
        );
        assert_eq!(exits["relabel_configs"][0]["regex"], "cloak;exit;admin");
        assert_eq!(
            config["scrape_configs"][2]["static_configs"][0]["targets"][0],
            "10.250.0.254:8081"
        );
        assert_eq!(config["rule_files"][0], "/lab/prometheus/alerts.yaml");
        assert_eq!(
            config["scrape_configs"][0]["relabel_configs"][2]["regex"],
            r"([^:]+)(?::\d+)?;(\d+)"
        );
    }
}
