//! The chained CNI plugin (`type: cloak` in the node's conflist, after the primary network's
//! plugins). It decides nothing: on ADD and DEL it hands the call to the node daemon over a
//! Unix socket and waits for its answer, as Istio's `istio-cni` and Multus's thick shim do. It
//! runs before any container of the pod starts (NODENOTES trap 8), so a client pod never has a
//! moment with an unprotected network.
//!
//! The pod's network namespace is handed over as an open file: the plugin opens `CNI_NETNS` and
//! the daemon reopens it through `/proc/<plugin pid>/fd/<fd>`, so the daemon needs to see the
//! host's processes (hostPID), not the runtime's netns paths.
//!
//! When the daemon cannot be asked (down, restarting, uninstalled by a `SIGKILL`), ADD reads the
//! daemon's last list of the namespaces that hold a gateway ([`Guarded`]): a pod of any other
//! namespace cannot be a client and starts, once the daemon has loaded its guard since the node
//! booted ([`guard_marker`]); a pod of a listed namespace (or any pod, without a list or a guard)
//! fails, and the kubelet retries the sandbox until the daemon answers, so no client starts
//! unattached. DEL never fails: a pod that is going away must not hang in Terminating because
//! the daemon is down (the daemon removes what is left of it when it starts again).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Where the daemon listens unless the plugin's config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/cloak/node.sock";
/// The CNI versions the plugin speaks.
pub const VERSIONS: [&str; 4] = ["0.4.0", "1.0.0", "1.1.0", "0.3.1"];
/// How long ADD waits for the daemon (attaching is a few `ip`/`nft` runs).
const TIMEOUT: Duration = Duration::from_secs(30);

/// A call the plugin forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    pub pod_namespace: String,
    pub pod_name: String,
    /// Where the daemon reopens the pod's network namespace (`/proc/<pid>/fd/<fd>`), while the
    /// plugin waits. None on a DEL whose namespace is already gone.
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Add,
    Del,
    /// `cloak node check`: the daemon answers once its kernel thread has run a job (liveness).
    Live,
    /// `cloak node check --ready`: and once it has listed the gateways (readiness).
    Ready,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// None: done (attached, or not a client). Some: why the pod must not start.
    pub error: Option<String>,
}

/// What the plugin's part of the conflist may say.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginConfig {
    #[serde(default)]
    cni_version: Option<String>,
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    prev_result: Option<Value>,
    /// Where the daemon keeps its [`Guarded`] list.
    #[serde(default)]
    guarded: Option<String>,
}

/// The namespaces where a pod may be a gateway's client: those that hold a gateway (a gateway
/// chooses its clients in its own namespace). The daemon rewrites it, by renaming, from every
/// complete list of the gateways; the plugin reads it only when the daemon cannot be asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Guarded {
    pub namespaces: std::collections::BTreeSet<String>,
}

impl Guarded {
    /// The list at `path`; None when it is missing or unreadable (nothing is known then).
    pub fn read(path: &std::path::Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Writes the list to `path` by renaming, so a reader never sees half of it.
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    }

    /// Whether a pod of `namespace` may be a client.
    pub fn guards(&self, namespace: &str) -> bool {
        self.namespaces.contains(namespace)
    }
}

/// Why a call failed, as the runtime reads it (CNI error codes: 4 invalid config, 11 try again
/// later, 999 plugin-specific).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    /// The error as the spec wants it on stdout.
    pub fn to_json(&self, version: &str) -> String {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg}).to_string()
    }
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` of `CNI_ARGS` (`A=1;B=2`, keys in any order, possibly
/// repeated under Multus: the first wins).
pub fn pod_of(cni_args: &str) -> Option<(String, String)> {
    let get = |key: &str| {
        cni_args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
    };
    Some((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
}

/// Runs one plugin call: `env` is the `CNI_*` environment, `stdin` the network config. Returns
/// what goes to stdout.
pub fn plugin(env: &dyn Fn(&str) -> Option<String>, stdin: &str) -> Result<String, CniError> {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        return Ok(json!({"cniVersion": "1.0.0", "supportedVersions": VERSIONS}).to_string());
    }
    let config: PluginConfig = serde_json::from_str(stdin)
        .map_err(|e| CniError::new(4, format!("cloak: the plugin's config: {e}")))?;
    let version = config.cni_version.clone().unwrap_or_else(|| "1.0.0".into());
    // What the plugins before this one made, passed on unchanged: the pod's primary network
    // stays exactly as the runtime's CNI set it up.
    let result = || {
        let mut prev = config.prev_result.clone().unwrap_or_else(|| json!({}));
        prev["cniVersion"] = Value::String(version.clone());
        prev.to_string()
    };
    let socket = config.socket.as_deref().unwrap_or(DEFAULT_SOCKET);
    let container_id = env("CNI_CONTAINERID").unwrap_or_default();
    let pod = env("CNI_ARGS").as_deref().and_then(pod_of);
    match command.as_str() {
        "ADD" => {
            let Some((pod_namespace, pod_name)) = pod else {
                // Not a Kubernetes pod (no K8S_POD_* arguments): nothing of cloak's.
                return Ok(result());
            };
            let netns_path =
                env("CNI_NETNS").ok_or_else(|| CniError::new(4, "cloak: ADD without CNI_NETNS"))?;
            let netns = std::fs::File::open(&netns_path)
                .map_err(|e| CniError::new(999, format!("cloak: opening {netns_path}: {e}")))?;
            let request = Request {
                command: Command::Add,
                container_id,
                pod_namespace,
                pod_name,
                netns: Some(format!(
                    "/proc/{}/fd/{}",
                    std::process::id(),
                    netns.as_raw_fd()
                )),
            };
            let reply = match ask(socket, &request) {
                Ok(reply) => reply,
                Err(e) => {
                    let guarded = config.guarded.as_deref().map(std::path::Path::new);
                    // Only once a guard was loaded since the node booted: before, any pod could
                    // spoof a node's address into the exits.
                    if guard_marker(std::path::Path::new(socket)).exists()
                        && guarded
                            .and_then(Guarded::read)
                            .is_some_and(|g| !g.guards(&request.pod_namespace))
                    {
                        // No gateway there: not a client, whatever its labels say.
                        return Ok(result());
                    }
                    return Err(CniError::new(
                        11,
                        format!(
                            "cloak: the node daemon at {socket} cannot be asked ({e}) and namespace {} may hold its clients; retry once it runs",
                            request.pod_namespace
                        ),
                    ));
                }
            };
            drop(netns);
            match reply.error {
                None => Ok(result()),
                Some(why) => Err(CniError::new(999, format!("cloak: {why}"))),
            }
        }
        "DEL" => {
            if let Some((pod_namespace, pod_name)) = pod {
                let request = Request {
                    command: Command::Del,
                    container_id,
                    pod_namespace,
                    pod_name,
                    netns: None,
                };
                // Best effort: the daemon also forgets clients whose interfaces are gone.
                let _ = ask(socket, &request);
            }
            Ok(String::new())
        }
        // CHECK and GC: nothing of the pod's primary network is cloak's to check.
        _ => Ok(String::new()),
    }
}

/// Asks the daemon at `socket` whether it is live (or, with `ready`, ready): None when it is,
/// otherwise why not. For the DaemonSet's probes (`cloak node check`).
pub fn check(socket: &str, ready: bool) -> Option<String> {
    let request = Request {
        command: if ready { Command::Ready } else { Command::Live },
        container_id: String::new(),
        pod_namespace: String::new(),
        pod_name: String::new(),
        netns: None,
    };
    match ask(socket, &request) {
        Ok(reply) => reply.error,
        Err(e) => Some(format!("the daemon at {socket} cannot be asked: {e}")),
    }
}

/// The file the daemon writes beside its socket once it has loaded its guard: the socket's
/// directory is a tmpfs (`/run/cloak`), so a reboot, which empties the ruleset, removes it too.
pub fn guard_marker(socket: &std::path::Path) -> std::path::PathBuf {
    socket.with_file_name("guard.loaded")
}

/// Sends one request and reads one reply (a JSON line each way).
pub fn ask(socket: &str, request: &Request) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_is_read_from_cni_args_in_any_order_and_the_first_repeat_wins() {
        assert_eq!(
            pod_of("IgnoreUnknown=1;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=x"),
            Some(("apps".into(), "web-0".into()))
        );
        assert_eq!(pod_of("IgnoreUnknown=1"), None);
    }

    #[test]
    fn version_add_without_a_pod_and_del_without_a_daemon_answer_without_failing() {
        let env = |command: &'static str| {
            move |key: &str| match key {
                "CNI_COMMAND" => Some(command.to_owned()),
                "CNI_CONTAINERID" => Some("c1".to_owned()),
                _ => None,
            }
        };
        let version = plugin(&env("VERSION"), "").unwrap();
        assert!(version.contains("1.0.0"), "{version}");
        let config = r#"{"cniVersion":"1.0.0","name":"lab","type":"cloak","socket":"/nonexistent.sock","prevResult":{"ips":[{"address":"10.244.1.5/24"}]}}"#;
        let added = plugin(&env("ADD"), config).unwrap();
        let added: Value = serde_json::from_str(&added).unwrap();
        assert_eq!(
            added["ips"][0]["address"], "10.244.1.5/24",
            "prevResult passed on"
        );
        assert_eq!(plugin(&env("DEL"), config).unwrap(), "");
    }

    #[test]
    fn add_fails_when_the_daemon_cannot_be_asked() {
        let env = |key: &str| match key {
            "CNI_COMMAND" => Some("ADD".to_owned()),
            "CNI_NETNS" => Some("/proc/self/ns/net".to_owned()),
            "CNI_ARGS" => Some("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b".to_owned()),
            _ => None,
        };
        let config = r#"{"cniVersion":"1.0.0","type":"cloak","socket":"/nonexistent.sock"}"#;
        let err = plugin(&env, config).unwrap_err();
        assert_eq!(err.code, 11);
        assert!(err.msg.contains("/nonexistent.sock"), "{err}");
        assert!(err.to_json("1.0.0").contains("\"code\":11"));
    }

    #[test]
    fn without_the_daemon_a_pod_starts_only_in_a_namespace_the_daemon_listed_as_holding_no_gateway()
    {
        let dir = std::env::temp_dir().join(format!("cloak-guarded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("guarded.json");
        let env = |ns: &'static str| {
            move |key: &str| match key {
                "CNI_COMMAND" => Some("ADD".to_owned()),
                "CNI_NETNS" => Some("/proc/self/ns/net".to_owned()),
                "CNI_ARGS" => Some(format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME=b")),
                _ => None,
            }
        };
        // No daemon listens there; its marker would be beside it.
        let socket = dir.join("node.sock");
        let config = json!({"cniVersion": "1.0.0", "type": "cloak", "socket": socket,
            "guarded": list, "prevResult": {"ips": [{"address": "10.244.1.5/24"}]}})
        .to_string();
        // No list yet: nothing is known, nothing starts.
        assert_eq!(plugin(&env("web"), &config).unwrap_err().code, 11);
        Guarded {
            namespaces: ["vpn".to_owned()].into(),
        }
        .write(&list)
        .unwrap();
        // A list, but no guard loaded since the node booted: nothing starts either.
        assert_eq!(plugin(&env("web"), &config).unwrap_err().code, 11);
        std::fs::write(guard_marker(&socket), b"").unwrap();
        let added: Value = serde_json::from_str(&plugin(&env("web"), &config).unwrap()).unwrap();
        assert_eq!(added["ips"][0]["address"], "10.244.1.5/24");
        let err = plugin(&env("vpn"), &config).unwrap_err();
        assert_eq!(err.code, 11);
        assert!(err.msg.contains("namespace vpn"), "{err}");
        std::fs::write(&list, b"{not json").unwrap();
        assert_eq!(
            plugin(&env("web"), &config).unwrap_err().code,
            11,
            "unreadable: unknown"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
