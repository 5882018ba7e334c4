//! Observability that does not need a running cluster: the chart's alert rules pass
//! `promtool check rules` and their unit tests (`tests/prometheus/alerts.test.yaml`, series that
//! should and should not fire), every alert has a runbook, and the dashboard's queries parse
//! (promtool, built from Prometheus's Go module by `tools/build-prometheus.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use cloak_testkit::{controlplane::prometheus_dir, repo_path};

fn promtool(args: &[&str]) -> String {
    let promtool = prometheus_dir().unwrap().join("promtool");
    let output = Command::new(&promtool)
        .args(args)
        .current_dir(repo_path("."))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

fn alerts() -> Vec<String> {
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_path("charts/cloak/files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "charts/cloak/files/alerts.yaml"]);
    assert!(
        checked.contains(&format!("{} rules found", alerts().len())),
        "{checked}"
    );
    let tested = promtool(&["test", "rules", "tests/prometheus/alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert is tested: named in an alert_rule_test with an alert expected to fire.
    let tests: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_path("tests/prometheus/alerts.test.yaml")).unwrap(),
    )
    .unwrap();
    let fired: Vec<&str> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap())
        .filter(|a| a["exp_alerts"].as_sequence().is_some_and(|e| !e.is_empty()))
        .map(|a| a["alertname"].as_str().unwrap())
        .collect();
    for alert in alerts() {
        assert!(
            fired.contains(&alert.as_str()),
            "{alert}: no test sees it fire"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_section_its_annotation_points_at() {
    let runbooks = std::fs::read_to_string(repo_path("docs/runbooks.md")).unwrap();
    let rules = std::fs::read_to_string(repo_path("charts/cloak/files/alerts.yaml")).unwrap();
    for alert in alerts() {
        assert!(
            runbooks.contains(&format!("\n## {alert}\n")),
            "docs/runbooks.md: no ## {alert}"
        );
        let anchor = format!("docs/runbooks.md#{}", alert.to_lowercase());
        assert!(
            rules.contains(&anchor),
            "{alert}: no runbook_url to {anchor}"
        );
    }
}

#[test]
fn every_dashboard_query_parses_and_names_only_cloak_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("charts/cloak/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    let queries: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    // promtool parses a rule file: each query becomes a recording rule.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"record": format!("dashboard:query{i}"), "expr": q}))
        .collect();
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()]);
    for query in queries {
        assert!(query.contains("cloak_"), "{query}: names no cloak metric");
    }
}
