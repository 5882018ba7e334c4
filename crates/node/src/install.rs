//! Putting the plugin into the node's CNI configuration and taking it out again: the `cloak`
//! binary copied into the CNI binary directory, and `{"type": "cloak"}` appended to the plugins
//! of every `*.conflist` of the configuration directory. Under Multus that is the cluster
//! network's list, which Multus reads from that directory and delegates to at every call; a list
//! whose plugins are Multus itself (`multus`, or the thick plugin's `multus-shim`) is left alone,
//! or the plugin would run twice. Both are idempotent and replace files by renaming, so the
//! runtime never reads half a file.

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
}

/// The `type`s of Multus, the meta-plugin whose own list delegates to the cluster network's.
const META_PLUGINS: [&str; 2] = ["multus", "multus-shim"];

/// `list` with the plugin appended (or its entry refreshed), or `None` when it holds it as is or
/// is a meta-plugin's list.
pub fn with_plugin(list: &Value, socket: &str) -> Option<Value> {
    let entry = json!({"type": PLUGIN, "socket": socket});
    let plugins = list.get("plugins")?.as_array()?;
    if plugins.iter().any(|p| {
        p.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| META_PLUGINS.contains(&t))
    }) {
        return None;
    }
    let mut kept: Vec<Value> = plugins
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN))
        .cloned()
        .collect();
    kept.push(entry);
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

fn conflists(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    Ok(files)
}

fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("cloak-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Installs the binary (`exe`) and the plugin entries. Returns the conflists changed.
pub fn install(paths: &Paths, exe: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&paths.bin_dir)?;
    let target = paths.bin_dir.join(PLUGIN);
    let tmp = paths.bin_dir.join(format!(".{PLUGIN}.tmp"));
    std::fs::copy(exe, &tmp)?;
    std::fs::rename(&tmp, &target)?;
    let mut changed = Vec::new();
    for file in conflists(&paths.conf_dir)? {
        let text = std::fs::read_to_string(&file)?;
        let Ok(list) = serde_json::from_str::<Value>(&text) else {
            tracing::warn!(file = %file.display(), "not JSON; left alone");
            continue;
        };
        if let Some(next) = with_plugin(&list, &paths.socket) {
            replace(&file, serde_json::to_string_pretty(&next)?.as_bytes())?;
            changed.push(file);
        }
    }
    Ok(changed)
}

/// Takes the plugin entries out and removes the binary.
pub fn uninstall(paths: &Paths) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for file in conflists(&paths.conf_dir)? {
        let text = std::fs::read_to_string(&file)?;
        let Ok(list) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(next) = without_plugin(&list) {
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
        let with = with_plugin(&list, "/run/cloak/node.sock").unwrap();
        assert_eq!(
            with["plugins"][2],
            json!({"type": "cloak", "socket": "/run/cloak/node.sock"})
        );
        assert_eq!(
            with_plugin(&with, "/run/cloak/node.sock"),
            None,
            "idempotent"
        );
        let moved = with_plugin(&with, "/other.sock").unwrap();
        assert_eq!(moved["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(without_plugin(&with).unwrap(), list);
        assert_eq!(without_plugin(&list), None);
    }

    #[test]
    fn a_multus_list_is_left_alone_for_the_cluster_network_it_delegates_to() {
        for meta in ["multus", "multus-shim"] {
            let list = json!({"cniVersion": "1.0.0", "name": "multus-cni-network",
                "plugins": [{"type": meta, "clusterNetwork": "lab"}]});
            assert_eq!(with_plugin(&list, "/run/cloak/node.sock"), None, "{meta}");
        }
    }

    #[test]
    fn install_and_uninstall_touch_only_conflists_and_the_binary() {
        let dir = std::env::temp_dir().join(format!("cloak-install-{}", std::process::id()));
        let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        let list = json!({"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": "bridge"}]});
        std::fs::write(conf.join("10-lab.conflist"), list.to_string()).unwrap();
        std::fs::write(conf.join("00-multus.conf"), r#"{"type":"multus"}"#).unwrap();
        let exe = dir.join("exe");
        std::fs::write(&exe, b"binary").unwrap();
        let paths = Paths {
            conf_dir: conf.clone(),
            bin_dir: bin.clone(),
            socket: "/run/cloak/node.sock".into(),
        };
        assert_eq!(
            install(&paths, &exe).unwrap(),
            [conf.join("10-lab.conflist")]
        );
        assert!(install(&paths, &exe).unwrap().is_empty());
        assert_eq!(std::fs::read(bin.join("cloak")).unwrap(), b"binary");
        assert_eq!(
            std::fs::read_to_string(conf.join("00-multus.conf")).unwrap(),
            r#"{"type":"multus"}"#
        );
        assert_eq!(uninstall(&paths).unwrap().len(), 1);
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(conf.join("10-lab.conflist")).unwrap())
                .unwrap();
        assert_eq!(back, list);
        assert!(!bin.join("cloak").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
