//! Putting the plugin into the node's CNI configuration and taking it out again: the `cloak`
//! binary copied into the CNI binary directory, and `{"type": "cloak"}` appended to the plugins
//! of the lists the runtime calls, in the configuration directory:
//! - every `*.conflist`, the cluster network's list included;
//! - under Multus, the network Multus delegates to. Multus's own configuration (a `.conf` or a
//!   list whose plugin is `multus` or the thick plugin's `multus-shim`) either names that network
//!   (`clusterNetwork`: a list of its own, in the directory, edited as above) or holds it inline
//!   in `delegates`, as Multus's DaemonSet writes it with `--multus-conf-file=auto`: a copy of the
//!   primary list made once, at its start, which a change to the primary list never reaches. The
//!   plugin goes into that copy (the first delegate, the cluster network), never beside Multus
//!   itself, or it would run twice or outside the delegation.
//!
//! A single-plugin `.conf` of another CNI is left alone: a plugin cannot be chained to it.
//! Both are idempotent and replace files by renaming, so the runtime never reads half a file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type`, and its binary's name in the CNI binary directory.
pub const PLUGIN: &str = "cloak";

/// Where the plugin goes.
#[derive(Debug, Clone)]
pub struct Paths {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The daemon's socket, as the plugin's config names it.
    pub socket: String,
    /// The daemon's list of the namespaces that hold a gateway ([`crate::cni::Guarded`]), which
    /// the plugin reads when the daemon cannot be asked.
    pub guarded: String,
}

impl Paths {
    /// The plugin's entry in a list.
    pub fn entry(&self) -> Value {
        json!({"type": PLUGIN, "socket": self.socket, "guarded": self.guarded})
    }
}

/// The `type`s of Multus, the meta-plugin whose own list delegates to the cluster network's.
const META_PLUGINS: [&str; 2] = ["multus", "multus-shim"];

fn is_meta(plugin: &Value) -> bool {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| META_PLUGINS.contains(&t))
}

/// `config` with `edit` applied to the list the runtime ends up calling, or `None` when that
/// changes nothing or the file holds no list of the cluster network's (see the module's text).
pub fn edited(config: &Value, edit: &dyn Fn(&Value) -> Option<Value>) -> Option<Value> {
    let plugins = config.get("plugins").and_then(Value::as_array);
    let meta = if is_meta(config) {
        Some(None)
    } else {
        plugins.and_then(|p| p.iter().position(is_meta)).map(Some)
    };
    match meta {
        // Multus: its inline cluster network, if it has one.
        Some(at) => {
            let multus = match at {
                None => config,
                Some(i) => &config["plugins"][i],
            };
            let first = multus.get("delegates")?.as_array()?.first()?;
            first.get("plugins")?;
            let next = edit(first)?;
            let mut out = config.clone();
            match at {
                None => out["delegates"][0] = next,
                Some(i) => out["plugins"][i]["delegates"][0] = next,
            }
            Some(out)
        }
        None if plugins.is_some() => edit(config),
        None => None,
    }
}

/// `list` with the plugin's `entry` appended (or refreshed), or `None` when it holds it as is.
pub fn with_plugin(list: &Value, entry: &Value) -> Option<Value> {
    let plugins = list.get("plugins")?.as_array()?;
    let mut kept: Vec<Value> = plugins
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN))
        .cloned()
        .collect();
    kept.push(entry.clone());
    if &kept == plugins {
        return None;
    }
    let mut out = list.clone();
    out["plugins"] = Value::Array(kept);
    Some(out)
}

/// `list` without the plugin, or `None` when it has none.
pub fn without_plugin(list: &Value) -> Option<Value> {
    let plugins = list.get("plugins")?.as_array()?;
    let kept: Vec<Value> = plugins
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN))
        .cloned()
        .collect();
    if kept.len() == plugins.len() {
        return None;
    }
    let mut out = list.clone();
    out["plugins"] = Value::Array(kept);
    Some(out)
}

/// The configuration files of `dir`, as the runtime and libcni see them.
fn configs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf")
        })
        .collect();
    files.sort();
    Ok(files)
}

fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("cloak-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Installs the binary (`exe`) and the plugin entries. Returns the files changed.
pub fn install(paths: &Paths, exe: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&paths.bin_dir)?;
    let target = paths.bin_dir.join(PLUGIN);
    let tmp = paths.bin_dir.join(format!(".{PLUGIN}.tmp"));
    std::fs::copy(exe, &tmp)?;
    std::fs::rename(&tmp, &target)?;
    let mut changed = Vec::new();
    for file in configs(&paths.conf_dir)? {
        let text = std::fs::read_to_string(&file)?;
        let Ok(config) = serde_json::from_str::<Value>(&text) else {
            tracing::warn!(file = %file.display(), "not JSON; left alone");
            continue;
        };
        if let Some(next) = edited(&config, &|list| with_plugin(list, &paths.entry())) {
            replace(&file, serde_json::to_string_pretty(&next)?.as_bytes())?;
            changed.push(file);
        }
    }
    Ok(changed)
}

/// Takes the plugin entries out and removes the binary.
pub fn uninstall(paths: &Paths) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for file in configs(&paths.conf_dir)? {
        let text = std::fs::read_to_string(&file)?;
        let Ok(config) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(next) = edited(&config, &without_plugin) {
            replace(&file, serde_json::to_string_pretty(&next)?.as_bytes())?;
            changed.push(file);
        }
    }
    match std::fs::remove_file(paths.bin_dir.join(PLUGIN)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_appended_once_and_taken_out_leaving_the_rest() {
        let list = json!({"cniVersion": "1.0.0", "name": "lab", "plugins": [
            {"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]});
        let entry = json!({"type": "cloak", "socket": "/run/cloak/node.sock"});
        let with = with_plugin(&list, &entry).unwrap();
        assert_eq!(with["plugins"][2], entry);
        assert_eq!(with_plugin(&with, &entry), None, "idempotent");
        let moved = with_plugin(&with, &json!({"type": "cloak", "socket": "/other.sock"})).unwrap();
        assert_eq!(moved["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(without_plugin(&with).unwrap(), list);
        assert_eq!(without_plugin(&list), None);
    }

    #[test]
    fn under_multus_the_plugin_goes_into_the_inline_cluster_network_and_never_beside_multus() {
        let entry = json!({"type": "cloak", "socket": "/run/cloak/node.sock"});
        let add = |c: &Value| edited(c, &|l| with_plugin(l, &entry));
        let remove = |c: &Value| edited(c, &without_plugin);
        let primary =
            json!({"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": "bridge"}]});
        // Multus naming its network: nothing here to edit (the network's own list is).
        for meta in ["multus", "multus-shim"] {
            let by_name = json!({"cniVersion": "1.0.0", "name": "multus-cni-network",
                "type": meta, "clusterNetwork": "lab"});
            assert_eq!(add(&by_name), None, "{meta}");
            let list = json!({"cniVersion": "1.0.0", "name": "multus-cni-network",
                "plugins": [{"type": meta, "clusterNetwork": "lab"}]});
            assert_eq!(add(&list), None, "{meta}");
        }
        // As Multus's DaemonSet writes it (`--multus-conf-file=auto`): the primary list inline,
        // with a second delegate (an extra default network) that must stay as it is.
        let auto = json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "multus",
            "kubeconfig": "/etc/cni/net.d/multus.d/multus.kubeconfig",
            "delegates": [primary.clone(), {"cniVersion": "1.0.0", "name": "extra", "plugins": [{"type": "macvlan"}]}]});
        let with = add(&auto).unwrap();
        assert_eq!(
            with["delegates"][0]["plugins"],
            json!([{"type": "bridge"}, entry])
        );
        assert_eq!(with["delegates"][1], auto["delegates"][1]);
        assert_eq!(with["kubeconfig"], auto["kubeconfig"]);
        assert_eq!(add(&with), None, "idempotent");
        assert_eq!(remove(&with).unwrap(), auto);
        assert_eq!(remove(&auto), None);
        // The same inside a list whose plugin is Multus.
        let listed = json!({"cniVersion": "1.0.0", "name": "multus-cni-network",
            "plugins": [{"type": "multus", "delegates": [primary.clone()]}]});
        let with = add(&listed).unwrap();
        assert_eq!(with["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(
            with["plugins"][0]["delegates"][0]["plugins"][1]["type"],
            "cloak"
        );
        assert_eq!(remove(&with).unwrap(), listed);
        // A single-plugin `.conf` of another CNI: nothing to chain to.
        assert_eq!(
            add(&json!({"cniVersion": "0.4.0", "name": "x", "type": "bridge"})),
            None
        );
    }

    #[test]
    fn install_and_uninstall_touch_only_the_lists_the_runtime_calls_and_the_binary() {
        let dir = std::env::temp_dir().join(format!("cloak-install-{}", std::process::id()));
        let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        let list = json!({"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": "bridge"}]});
        std::fs::write(conf.join("10-lab.conflist"), list.to_string()).unwrap();
        std::fs::write(conf.join("00-multus.conf"), r#"{"type":"multus"}"#).unwrap();
        let auto = json!({"type": "multus", "delegates": [list.clone()]});
        std::fs::write(conf.join("01-auto.conf"), auto.to_string()).unwrap();
        std::fs::write(conf.join("02-other.json"), auto.to_string()).unwrap();
        let exe = dir.join("exe");
        std::fs::write(&exe, b"binary").unwrap();
        let paths = Paths {
            conf_dir: conf.clone(),
            bin_dir: bin.clone(),
            socket: "/run/cloak/node.sock".into(),
            guarded: "/var/lib/cloak/node/guarded.json".into(),
        };
        assert_eq!(
            install(&paths, &exe).unwrap(),
            [conf.join("01-auto.conf"), conf.join("10-lab.conflist")]
        );
        assert!(install(&paths, &exe).unwrap().is_empty());
        assert_eq!(std::fs::read(bin.join("cloak")).unwrap(), b"binary");
        assert_eq!(
            std::fs::read_to_string(conf.join("00-multus.conf")).unwrap(),
            r#"{"type":"multus"}"#
        );
        assert_eq!(uninstall(&paths).unwrap().len(), 2);
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(conf.join("01-auto.conf")).unwrap())
                .unwrap();
        assert_eq!(back, auto);
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(conf.join("10-lab.conflist")).unwrap())
                .unwrap();
        assert_eq!(back, list);
        assert!(!bin.join("cloak").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
