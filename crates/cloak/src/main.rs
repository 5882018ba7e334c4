//! The `cloak` binary: parses the command line and hands off to the crate that owns the work.
//! Nothing here decides anything; each subcommand is a thin call into a library crate.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Hide Kubernetes pods behind VPN services.
#[derive(Debug, Parser)]
#[command(name = "cloak", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what deploy/crds/ holds).
    Crds,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => print_crds(&mut std::io::stdout().lock()),
    }
}

/// Writes every CRD as one multi-document YAML stream, byte for byte what `deploy/crds/` holds.
fn print_crds(out: &mut impl Write) -> anyhow::Result<()> {
    out.write_all(render_crds()?.as_bytes())
        .context("writing CRDs")
}

fn render_crds() -> anyhow::Result<String> {
    let mut yaml = String::new();
    for crd in cloak_api::crds() {
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&crd).context("serializing a CRD")?);
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn checked_in_crds_match_the_rust_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/crds/cloak.dev.yaml"
        );
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == render_crds().unwrap(),
            "deploy/crds/cloak.dev.yaml is stale: run `cargo run -q -p cloak -- crds > deploy/crds/cloak.dev.yaml`"
        );
    }
}
