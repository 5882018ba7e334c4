//! The agent config examples in README.md (```yaml agent blocks) are read by the agent's own
//! parser, so the documented keys cannot drift from the code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cloak_agent::config::{AgentConfig, ProbeTarget, Resolved};
use cloak_dataplane::Key;

#[test]
fn every_agent_example_in_the_readme_is_a_valid_config() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let readme = std::fs::read_to_string(format!("{manifest}/../../README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```yaml agent\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty(), "README has no agent example");
    let dir = tempfile::tempdir().unwrap();
    let wg0 = dir.path().join("wg0.conf");
    std::fs::write(
        &wg0,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.64.0.2/32\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 0.0.0.0/0\n",
            &*Key::generate().to_base64(),
            Key::generate().public()
        ),
    )
    .unwrap();
    for block in blocks {
        let mut config: AgentConfig = serde_yaml::from_str(block)
            .unwrap_or_else(|e| panic!("README agent example does not parse: {e}\n{block}"));
        // The example's credentials path is the pod's; point it at a file this test wrote.
        config.credentials = wg0.clone();
        let resolved = Resolved::from_config(config, dir.path()).unwrap();
        assert!(matches!(resolved.probe, Some(ProbeTarget::Http { .. })));
    }
}
