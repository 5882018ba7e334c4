//! The lab's container images, built on this machine without a registry: each is one
//! uncompressed layer in an OCI image-layout archive, imported into every node's containerd and
//! used with `imagePullPolicy: Never`.
//!
//! - `cloak.dev/lab/cloak:dev`: the running `cloak` binary and what `cloak agent` runs (the
//!   executables of [`CLOAK_PACKAGES`], taken from this machine's Debian packages), each with the
//!   shared libraries `ldd` names. `images/cloak/Containerfile` installs the same packages for a
//!   published image; a test keeps the two lists equal.
//! - `cloak.dev/lab/pause:dev`: the sandbox container, a static C program.
//! - `cloak.dev/lab/coredns:dev`: CoreDNS, a static Go binary.
//! - `cloak.dev/lab/client:dev`: busybox (static) and a UDP echo server, for demo workloads.
//!
//! Layers are reproducible (every timestamp 0, entries sorted), so an unchanged image keeps its
//! digest and importing it again changes nothing.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The Debian packages whose executables the cloak image carries; `images/cloak/Containerfile`
/// installs exactly these.
pub const CLOAK_PACKAGES: [&str; 5] = [
    "conntrack",
    "iproute2",
    "nftables",
    "openvpn",
    "wireguard-tools",
];

pub(crate) const CLOAK_IMAGE: &str = "cloak.dev/lab/cloak:dev";
pub(crate) const PAUSE_IMAGE: &str = "cloak.dev/lab/pause:dev";
pub(crate) const COREDNS_IMAGE: &str = "cloak.dev/lab/coredns:dev";
pub(crate) const CLIENT_IMAGE: &str = "cloak.dev/lab/client:dev";

/// The busybox applets the client image links.
const BUSYBOX_APPLETS: [&str; 19] = [
    "sh", "cat", "echo", "sleep", "nc", "wget", "ls", "ip", "ping", "printf", "date", "hostname",
    "env", "grep", "head", "nslookup", "tail", "httpd", "mkdir",
];

/// What goes at one path of an image.
#[derive(Debug, Clone)]
enum Content {
    File { bytes: Vec<u8>, mode: u32 },
    Dir { mode: u32 },
    Symlink(String),
}

/// An image being assembled: path inside the image → content.
#[derive(Debug)]
pub(crate) struct Image {
    name: &'static str,
    entries: BTreeMap<String, Content>,
    entrypoint: Vec<String>,
}

impl Image {
    fn new(name: &'static str, entrypoint: &[&str]) -> Self {
        let mut image = Self {
            name,
            entries: BTreeMap::new(),
            entrypoint: entrypoint.iter().map(|s| (*s).to_owned()).collect(),
        };
        image.dir("/tmp", 0o1777);
        image.dir("/run", 0o755);
        image.dir("/proc", 0o555);
        image.dir("/sys", 0o555);
        image.dir("/dev", 0o755);
        image.file(
            "/etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n"
                .to_vec(),
            0o644,
        );
        image.file(
            "/etc/group",
            b"root:x:0:\nnonroot:x:65532:\n".to_vec(),
            0o644,
        );
        image
    }

    fn dir(&mut self, path: &str, mode: u32) {
        self.entries.insert(path.to_owned(), Content::Dir { mode });
    }

    fn file(&mut self, path: &str, bytes: Vec<u8>, mode: u32) {
        self.entries
            .insert(path.to_owned(), Content::File { bytes, mode });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entries
            .insert(path.to_owned(), Content::Symlink(target.to_owned()));
    }

    /// Copies a host file (following symlinks) to `path`, keeping its mode.
    fn copy(&mut self, host: &Path, path: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let bytes = fs::read(host).map_err(Error::io(host))?;
        let mode = fs::metadata(host)
            .map_err(Error::io(host))?
            .permissions()
            .mode()
            & 0o7777;
        self.file(path, bytes, mode);
        Ok(())
    }

    /// Copies a dynamically linked executable and every library `ldd` resolves for it, to the
    /// same paths (in the merged-/usr layout Debian 12 uses).
    fn copy_with_libraries(&mut self, host: &Path, path: &str) -> Result<()> {
        self.copy(host, path)?;
        for library in libraries(host)? {
            let inside = merged_usr(&library.to_string_lossy());
            self.copy(&library, &inside)?;
        }
        Ok(())
    }

    /// The merged-/usr links (`/bin` → `usr/bin`, ...), as on the host.
    fn usr_merge(&mut self) {
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/sbin", "usr/sbin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
        ] {
            self.symlink(link, target);
        }
    }

    /// The image's single layer: a tar of every entry with its parent directories.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut entries = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = Path::new(path).parent();
            while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
                entries
                    .entry(p.to_string_lossy().into_owned())
                    .or_insert(Content::Dir { mode: 0o755 });
                parent = p.parent();
            }
        }
        let mut tar = tar::Builder::new(Vec::new());
        for (path, content) in &entries {
            let relative = path.trim_start_matches('/');
            let mut header = tar::Header::new_ustar();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            let fail = |e: std::io::Error| Error::Other(format!("{}: {path}: {e}", self.name));
            match content {
                Content::File { bytes, mode } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(bytes.len() as u64);
                    tar.append_data(&mut header, relative, bytes.as_slice())
                        .map_err(fail)?;
                }
                Content::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{relative}/"), std::io::empty())
                        .map_err(fail)?;
                }
                Content::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, relative, target)
                        .map_err(fail)?;
                }
            }
        }
        tar.into_inner()
            .map_err(|e| Error::Other(format!("{}: {e}", self.name)))
    }

    /// Writes the OCI image-layout archive to `out` and returns the image's manifest digest.
    pub(crate) fn write_archive(&self, out: &Path) -> Result<String> {
        let layer = self.layer()?;
        let layer_digest = sha256(&layer);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
        .to_string()
        .into_bytes();
        let config_digest = sha256(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string()
        .into_bytes();
        let manifest_digest = sha256(&manifest);
        let tag = self.name.rsplit(':').next().unwrap_or("latest");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        })
        .to_string()
        .into_bytes();
        let mut files: Vec<(String, &[u8])> = vec![
            ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
            ("index.json".into(), &index),
        ];
        for (digest, bytes) in [
            (&layer_digest, layer.as_slice()),
            (&config_digest, config.as_slice()),
            (&manifest_digest, manifest.as_slice()),
        ] {
            files.push((
                format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
                bytes,
            ));
        }
        let mut tar = tar::Builder::new(Vec::new());
        for (path, bytes) in files {
            let mut header = tar::Header::new_ustar();
            header.set_mtime(0);
            header.set_mode(0o644);
            header.set_size(bytes.len() as u64);
            tar.append_data(&mut header, &path, bytes)
                .map_err(|e| Error::Other(format!("{}: {path}: {e}", self.name)))?;
        }
        let archive = tar
            .into_inner()
            .map_err(|e| Error::Other(format!("{}: {e}", self.name)))?;
        fs::write(out, archive).map_err(Error::io(out))?;
        Ok(manifest_digest)
    }
}

/// The cloak image: `cloak` (this very binary) and the agent's tools with their libraries.
pub(crate) fn cloak(binary: &Path) -> Result<Image> {
    let mut image = Image::new(CLOAK_IMAGE, &["/usr/local/bin/cloak"]);
    image.usr_merge();
    image.copy_with_libraries(binary, "/usr/local/bin/cloak")?;
    for package in CLOAK_PACKAGES {
        for exe in package_executables(package)? {
            let inside = merged_usr(&exe.to_string_lossy());
            image.copy_with_libraries(&exe, &inside)?;
        }
    }
    image.dir("/etc/cloak", 0o755);
    image.dir("/run/cloak", 0o700);
    Ok(image)
}

pub(crate) fn pause(binary: &Path) -> Result<Image> {
    let mut image = Image::new(PAUSE_IMAGE, &["/pause"]);
    image.copy(binary, "/pause")?;
    Ok(image)
}

pub(crate) fn coredns(binary: &Path) -> Result<Image> {
    let mut image = Image::new(COREDNS_IMAGE, &["/coredns"]);
    image.copy(binary, "/coredns")?;
    Ok(image)
}

/// busybox-static as the client image (its `sh`, `nc`, `httpd`, ...), and `udp-echo PORT`.
pub(crate) fn client(udp_echo: &Path) -> Result<Image> {
    let mut image = Image::new(CLIENT_IMAGE, &["/bin/sh"]);
    image.copy(Path::new("/bin/busybox"), "/bin/busybox")?;
    image.copy(udp_echo, "/bin/udp-echo")?;
    for applet in BUSYBOX_APPLETS {
        image.symlink(&format!("/bin/{applet}"), "busybox");
    }
    Ok(image)
}

/// The executables a Debian package installed (in `bin`/`sbin` directories).
fn package_executables(package: &str) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let listed = crate::sh::run(&["dpkg", "-L", package]).map_err(|e| {
        Error::Other(format!(
            "the cloak image needs Debian package {package} installed ({e}); tools/install-deps.sh installs it"
        ))
    })?;
    let mut found = Vec::new();
    for line in listed.lines() {
        let path = Path::new(line);
        let in_bin = path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "bin" || d == "sbin");
        let executable = fs::symlink_metadata(path)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if in_bin && executable {
            found.push(path.to_owned());
        }
    }
    if found.is_empty() {
        return Err(Error::Other(format!(
            "Debian package {package} has no executables here"
        )));
    }
    Ok(found)
}

/// The shared libraries (and the dynamic loader) `ldd` resolves for `binary`; none for a static
/// one.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = match crate::sh::run(&[Path::new("ldd"), binary]) {
        Ok(out) => out,
        // ldd exits 1 for static executables ("not a dynamic executable").
        Err(Error::Command { stderr, .. }) if stderr.contains("not a dynamic") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
        if line.contains("not found") {
            return Err(Error::Other(format!(
                "{}: a library is missing: {line}",
                binary.display()
            )));
        }
    }
    Ok(libs)
}

/// `/lib/x` → `/usr/lib/x` (and `/bin`, `/sbin`, `/lib64`): where the file really is under
/// Debian 12's merged /usr, so the image's links resolve to it.
fn merged_usr(path: &str) -> String {
    for top in ["/bin/", "/sbin/", "/lib/", "/lib64/"] {
        if let Some(rest) = path.strip_prefix(top) {
            return format!("/usr{top}{rest}");
        }
    }
    path.to_owned()
}

fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    format!("sha256:{}", hex(digest.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_moves_top_level_directories_under_usr() {
        assert_eq!(
            merged_usr("/lib/x86_64-linux-gnu/libc.so.6"),
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(
            merged_usr("/lib64/ld-linux-x86-64.so.2"),
            "/usr/lib64/ld-linux-x86-64.so.2"
        );
        assert_eq!(merged_usr("/sbin/ip"), "/usr/sbin/ip");
        assert_eq!(merged_usr("/usr/bin/wg"), "/usr/bin/wg");
        assert_eq!(merged_usr("/libexec/x"), "/libexec/x");
    }

    #[test]
    fn a_layer_is_reproducible_and_lists_parent_directories() {
        let build = || {
            let mut image = Image::new("test/x:1", &["/x"]);
            image.file("/a/b/c", b"hi".to_vec(), 0o755);
            image.layer().unwrap()
        };
        let layer = build();
        assert_eq!(layer, build());
        let mut archive = tar::Archive::new(layer.as_slice());
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in ["a/", "a/b/", "a/b/c", "etc/passwd", "tmp/"] {
            assert!(
                paths.iter().any(|p| p == want),
                "{want} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn sha256_is_the_standard_digest() {
        assert_eq!(
            sha256(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

#[cfg(test)]
mod containerfile {
    /// The package list of `apt-get install` in `images/cloak/Containerfile`.
    fn containerfile_packages() -> Vec<String> {
        let path = cloak_testkit::repo_path("images/cloak/Containerfile");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let joined = text.replace("\\\n", " ");
        let install = joined
            .lines()
            .find(|l| l.contains("apt-get install"))
            .unwrap_or_else(|| panic!("no apt-get install in {}", path.display()));
        let after = install.split("apt-get install").nth(1).unwrap_or_default();
        let mut packages: Vec<String> = after
            .split("&&")
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .filter(|w| !w.starts_with('-'))
            .map(str::to_owned)
            .collect();
        packages.sort();
        packages
    }

    #[test]
    fn the_containerfile_installs_exactly_the_packages_the_lab_image_carries() {
        let mut ours: Vec<String> = super::CLOAK_PACKAGES
            .iter()
            .map(|p| (*p).to_owned())
            .collect();
        ours.sort();
        assert_eq!(containerfile_packages(), ours);
    }
}
