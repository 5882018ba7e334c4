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
    /// Run the VpnProvider and VpnMask controllers (in the cluster, or against any kubeconfig).
    Operator(OperatorArgs),
}

#[derive(Debug, clap::Args)]
struct OperatorArgs {
    /// Admin server address (/livez, /readyz, /metrics).
    #[arg(long, env = "CLOAK_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: std::net::SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "CLOAK_LEASE_NAME", default_value = "cloak-operator")]
    lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "CLOAK_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This instance's identity in leader election and Events.
    #[arg(long, env = "CLOAK_POD_NAME", default_value = "cloak-operator")]
    pod_name: String,
    /// Act without leader election (only for a single instance).
    #[arg(long, env = "CLOAK_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// URL answering with the caller's public IP, used by verification pods.
    #[arg(
        long,
        env = "CLOAK_VERIFY_IP_URL",
        default_value = "https://ifconfig.me/ip"
    )]
    verify_ip_url: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => print_crds(&mut std::io::stdout().lock()),
        Command::Operator(args) => run_operator(args),
    }
}

fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let config = cloak_operator::Config {
            instance: args.pod_name,
            admin_addr: Some(args.admin_addr),
            leader_lease: (!args.no_leader_election)
                .then_some((args.lease_namespace, args.lease_name)),
            verify_ip_url: args.verify_ip_url,
            ..cloak_operator::Config::default()
        };
        // Kubernetes stops pods with SIGTERM; a terminal sends SIGINT.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        Box::pin(cloak_operator::run(client, config, shutdown))
            .await
            .context("operator")
    })
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
