//! A real Kubernetes control plane on loopback for integration tests.
//!
//! [`ControlPlane::start`] runs etcd and kube-apiserver (built by `tools/build-control-plane.sh`)
//! on free 127.0.0.1 ports in a fresh directory with fresh certificates, waits for `/readyz`,
//! installs cloak's CRDs from `deploy/crds/` and hands out [`kube::Client`]s.
//! kube-controller-manager (garbage collection, namespaces, Deployments) starts on request.
//!
//! Cleanup does not depend on destructors running. Every server runs under a small shell
//! watchdog whose standard input is a pipe held by the test process: when the test process ends
//! in any way (normal exit, panic, SIGKILL), the pipe closes, the watchdog stops its server and a
//! janitor removes the directory once every watchdog is gone. A control plane left by a process
//! killed together with its watchdogs is reaped by the next [`ControlPlane::start`], which kills
//! the recorded PIDs (after checking they still run one of our binaries) and removes the directory.
//!
//! One control plane is shared by all tests of a test binary ([`ControlPlane::shared`]); tests
//! isolate themselves with a fresh namespace each ([`TestNamespace`]).

use std::{
    fs,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use std::os::unix::process::CommandExt;

/// The field manager the harness applies CRDs with.
const FIELD_MANAGER: &str = "cloak-testkit";
/// Where every control plane of this machine lives; one subdirectory each.
const STATE_DIR_NAME: &str = "cloak-testkit";
/// The binaries a control plane may run; the reaper kills only processes running one of these.
const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];
/// How long a server may take to answer its readiness endpoint. kube-apiserver needs ~2-5 s
/// here when cached; the margin covers a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Stops the server it supervises when its standard input closes (the test process ended or the
/// harness dropped the pipe), then waits up to 10 s before SIGKILL.
/// Arguments: log file, pid file, command...
const WATCHDOG: &str = r#"
log=$1; pidfile=$2; shift 2
"$@" </dev/null >>"$log" 2>&1 &
child=$!
echo "$child" >"$pidfile"
cat >/dev/null
kill -TERM "$child" 2>/dev/null
i=0
while kill -0 "$child" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
kill -KILL "$child" 2>/dev/null
wait "$child" 2>/dev/null
exit 0
"#;

/// Removes the control plane's directory after its standard input closes and every watchdog
/// listed in `watchdogs` has exited (at most 15 s), killing first any server a watchdog could not
/// stop. Argument: the directory.
const JANITOR: &str = r#"
dir=$1
cat >/dev/null
i=0
while [ "$i" -lt 150 ]; do
  alive=0
  for p in $(cat "$dir/watchdogs" 2>/dev/null); do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.1; i=$((i+1))
done
for f in "$dir"/*.pid; do
  p=$(cat "$f" 2>/dev/null) || continue
  exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
  case "${exe##*/}" in etcd|kube-apiserver|kube-controller-manager) kill -KILL "$p";; esac
done
rm -rf "$dir"
"#;

/// Why a control plane could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the control-plane binaries failed: {0}")]
    Build(String),
    #[error("generating certificates: {0}")]
    Certs(#[from] cloak_lab::Error),
    #[error("{name} did not become ready within {timeout:?}; last error: {last}; log tail:\n{log}")]
    NotReady {
        name: &'static str,
        timeout: Duration,
        last: String,
        log: String,
    },
    #[error("{name} exited during start-up; log tail:\n{log}")]
    Exited { name: &'static str, log: String },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("reading CRD {path}: {source}")]
    CrdYaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One server process under its watchdog.
#[derive(Debug)]
struct Supervised {
    name: &'static str,
    watchdog: Child,
    /// Closing this tells the watchdog to stop the server.
    stdin: Option<ChildStdin>,
    log: PathBuf,
    pidfile: PathBuf,
}

impl Supervised {
    fn server_pid(&self) -> Option<u32> {
        fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()
    }

    fn server_alive(&self) -> bool {
        // Before the pid file exists the server is still being started.
        self.server_pid()
            .is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.watchdog.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The watchdog is stuck; end it and its server directly.
        if let Some(pid) = self.server_pid() {
            kill(pid, "KILL");
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running control plane. Dropping it stops every process it started and removes its files.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    config: Config,
    /// etcd, kube-apiserver, then kube-controller-manager once started; stopped in reverse.
    servers: Mutex<Vec<Supervised>>,
    janitor: Mutex<Option<Supervised>>,
    startup: Duration,
}

impl ControlPlane {
    /// The control plane shared by every test in this test binary, started on first use.
    ///
    /// # Panics
    /// When the control plane cannot be started: every integration test needs it.
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            // Started on a runtime of its own: each #[tokio::test] has its own runtime, which
            // ends with the test, and nothing started here may depend on one of them.
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(Self::start()).map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("control-plane start-up panicked".to_owned()))
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("local control plane unavailable: {e}"),
        }
    }

    /// Starts etcd and kube-apiserver, waits until ready and installs cloak's CRDs.
    pub async fn start() -> Result<Self, Error> {
        let began = Instant::now();
        let root = state_root();
        fs::create_dir_all(&root).map_err(Error::io(&root))?;
        reap_stale(&root);
        let bin_dir = control_plane_binaries()?;

        let dir = root.join(format!("cp-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        fs::write(
            dir.join("owner"),
            owner_record(std::process::id()).unwrap_or_default(),
        )
        .map_err(Error::io(&dir))?;
        let janitor = spawn_supervised(
            &dir,
            "janitor",
            &["sh", "-c", JANITOR, "janitor", &path_str(&dir)],
            false,
        )?;
        let janitor_pid = dir.join("janitor.pid");
        fs::write(&janitor_pid, janitor.watchdog.id().to_string())
            .map_err(Error::io(&janitor_pid))?;

        let certs = cloak_lab::certs::generate(&dir)?;
        let [etcd_port, peer_port, api_port] = free_ports::<3>(&dir)?;
        let kubeconfig = dir.join("admin.kubeconfig");
        fs::write(
            &kubeconfig,
            cloak_lab::certs::kubeconfig(&format!("https://127.0.0.1:{api_port}"), &certs),
        )
        .map_err(Error::io(&kubeconfig))?;

        let mut servers = Vec::new();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let d = |name: &str| path_str(&dir.join(name));
        servers.push(spawn_supervised(
            &dir,
            "etcd",
            &[
                &path_str(&bin_dir.join("etcd")),
                "--name=default",
                &format!("--data-dir={}", d("etcd")),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=default={peer_url}"),
                // Test data is disposable; fsync only slows every write.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            true,
        )?);
        servers.push(spawn_supervised(
            &dir,
            "kube-apiserver",
            &[
                &path_str(&bin_dir.join("kube-apiserver")),
                &format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", d("apiserver-certs")),
                &format!("--tls-cert-file={}", d("apiserver.crt")),
                &format!("--tls-private-key-file={}", d("apiserver.key")),
                &format!("--client-ca-file={}", d("ca.crt")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", d("sa.pub")),
                &format!("--service-account-signing-key-file={}", d("sa.key")),
                // Only a configuration value: nothing here routes to it.
                "--service-cluster-ip-range=10.96.0.0/16",
                // As kubeadm and the lab: gateway exits are privileged pods.
                "--allow-privileged=true",
                "--authorization-mode=RBAC",
                // No kubelet runs pods here, and the default ServiceAccount only exists once
                // kube-controller-manager has run; tests create pods without one.
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                "--v=0",
            ],
            true,
        )?);

        let config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let mut cp = Self {
            dir,
            bin_dir,
            kubeconfig,
            config,
            servers: Mutex::new(servers),
            janitor: Mutex::new(Some(janitor)),
            startup: Duration::ZERO,
        };
        cp.wait_ok(&cp.client(), "kube-apiserver", "/readyz")
            .await?;
        cp.install_crds().await?;
        cp.startup = began.elapsed();
        Ok(cp)
    }

    /// Starts kube-controller-manager (garbage collector, namespace, Deployment, ReplicaSet and
    /// the other default controllers) unless it already runs. Idempotent.
    pub async fn ensure_controller_manager(&self) -> Result<(), Error> {
        {
            let servers = self
                .servers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if servers.iter().any(|s| s.name == "kube-controller-manager") {
                return Ok(());
            }
        }
        let [port] = free_ports::<1>(&self.dir)?;
        let d = |name: &str| path_str(&self.dir.join(name));
        let kcm = spawn_supervised(
            &self.dir,
            "kube-controller-manager",
            &[
                &path_str(&self.bin_dir.join("kube-controller-manager")),
                &format!("--kubeconfig={}", path_str(&self.kubeconfig)),
                &format!("--authentication-kubeconfig={}", path_str(&self.kubeconfig)),
                &format!("--authorization-kubeconfig={}", path_str(&self.kubeconfig)),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={port}"),
                &format!("--cert-dir={}", d("kcm-certs")),
                "--leader-elect=false",
                "--controllers=*",
                "--use-service-account-credentials=false",
                &format!("--service-account-private-key-file={}", d("sa.key")),
                &format!("--root-ca-file={}", d("ca.crt")),
                "--v=0",
            ],
            true,
        )?;
        self.servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(kcm);
        self.wait_controller_manager(port).await
    }

    /// A new client for the calling test's runtime.
    ///
    /// # Panics
    /// When the stored configuration cannot make a client, which only a broken build causes.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone())
            .unwrap_or_else(|e| panic!("building a kube client: {e}"))
    }

    /// The admin client's configuration, for a client with middleware of the test's own
    /// (`kube::client::ClientBuilder::try_from(cp.config())`).
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// A client that reaches the API server at `addr` (a proxy in front of it) instead: the
    /// server's certificate names 127.0.0.1, so any loopback port will do.
    ///
    /// # Panics
    /// When the stored configuration cannot make a client, which only a broken build causes.
    pub fn client_via(&self, addr: std::net::SocketAddr) -> Client {
        let mut config = self.config.clone();
        config.cluster_url = format!("https://{addr}")
            .parse()
            .unwrap_or_else(|e| panic!("proxy URL: {e}"));
        Client::try_from(config).unwrap_or_else(|e| panic!("building a kube client: {e}"))
    }

    /// The API server's address.
    ///
    /// # Panics
    /// When the stored URL has no host and port, which only a broken build causes.
    pub fn api_addr(&self) -> std::net::SocketAddr {
        let url = &self.config.cluster_url;
        format!(
            "{}:{}",
            url.host().unwrap_or("127.0.0.1"),
            url.port_u16().unwrap_or(443)
        )
        .parse()
        .unwrap_or_else(|e| panic!("API server address: {e}"))
    }

    /// A client that acts as `user` (e.g. `system:serviceaccount:ns:name`) through impersonation,
    /// with only that user's RBAC permissions: how tests prove a Role grants enough.
    ///
    /// # Panics
    /// When the stored configuration cannot make a client, which only a broken build causes.
    pub fn client_as(&self, user: &str) -> Client {
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(user.to_owned());
        Client::try_from(config).unwrap_or_else(|e| panic!("building a kube client: {e}"))
    }

    /// The admin kubeconfig, for `kubectl --kubeconfig` and `helm --kubeconfig`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Wall time from [`ControlPlane::start`] until the API server was ready with CRDs installed.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The directory holding this control plane's certificates, data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PIDs of the servers (not the watchdogs) now running, for tests of the cleanup itself.
    pub fn server_pids(&self) -> Vec<u32> {
        let servers = self
            .servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        servers.iter().filter_map(Supervised::server_pid).collect()
    }

    /// Polls `path` through `client` until it answers `ok`, failing early when a server died.
    async fn wait_ok(&self, client: &Client, name: &'static str, path: &str) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let last = match http::Request::get(path).body(Vec::new()) {
                Ok(req) => match client.request_text(req).await {
                    Ok(body) if body.trim() == "ok" => return Ok(()),
                    Ok(body) => body,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(self.not_ready(name, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// kube-controller-manager serves `/healthz` with its own self-signed certificate; the admin
    /// client trusts only our CA, so it is asked by a client that skips verification.
    async fn wait_controller_manager(&self, port: u16) -> Result<(), Error> {
        let name = "kube-controller-manager";
        let mut config = self.config.clone();
        config.cluster_url = format!("https://127.0.0.1:{port}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| self.not_ready(name, e.to_string()))?;
        config.accept_invalid_certs = true;
        config.root_cert = None;
        self.wait_ok(&Client::try_from(config)?, name, "/healthz")
            .await
    }

    fn check_alive(&self) -> Result<(), Error> {
        let servers = self
            .servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match servers.iter().find(|s| !s.server_alive()) {
            Some(dead) => Err(Error::Exited {
                name: dead.name,
                log: dead.log_tail(),
            }),
            None => Ok(()),
        }
    }

    fn not_ready(&self, name: &'static str, last: String) -> Error {
        let servers = self
            .servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let log = servers
            .iter()
            .find(|s| s.name == name)
            .map(Supervised::log_tail)
            .unwrap_or_default();
        Error::NotReady {
            name,
            timeout: READY_TIMEOUT,
            last,
            log,
        }
    }

    /// Applies every CRD in `deploy/crds/` and waits until each is Established.
    async fn install_crds(&self) -> Result<(), Error> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client());
        let dir = crds_dir();
        let mut names = Vec::new();
        let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(Error::io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        entries.sort();
        for path in entries {
            let text = fs::read_to_string(&path).map_err(Error::io(&path))?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let crd: CustomResourceDefinition =
                    serde::Deserialize::deserialize(doc).map_err(|source| Error::CrdYaml {
                        path: path.clone(),
                        source,
                    })?;
                let name = crd.name_any();
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&crd),
                )
                .await?;
                names.push(name);
            }
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for name in names {
            loop {
                let crd = api.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(
                        self.not_ready("kube-apiserver", format!("CRD {name} not Established"))
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut servers = std::mem::take(
            self.servers
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        while let Some(mut server) = servers.pop() {
            server.stop();
        }
        if let Some(mut janitor) = self
            .janitor
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            janitor.stop();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A namespace of its own for one test, named after it. Not deleted afterwards: without
/// kube-controller-manager a namespace never finishes deleting, and the whole control plane is
/// thrown away with the test binary anyway.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
}

impl TestNamespace {
    /// Creates `<prefix>-<n>` (prefix cut to fit a DNS label).
    pub async fn create(client: &Client, prefix: &str) -> Result<Self, Error> {
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(50)
            .collect();
        let name = format!("{}-{}", prefix.trim_matches('-'), unique());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self { name })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// `deploy/crds/` of this repository.
pub fn crds_dir() -> PathBuf {
    crate::repo_path("deploy/crds")
}

/// Runs `tools/build-control-plane.sh` (a no-op when cached) and returns the binaries' directory,
/// or takes it from `CLOAK_CONTROL_PLANE_BIN`.
fn control_plane_binaries() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("CLOAK_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    built_by("tools/build-control-plane.sh")
}

/// The directory holding `prometheus`, `promtool` and the prometheus-operator's CRDs
/// (`crds/`), built by `tools/build-prometheus.sh` (a no-op when cached).
pub fn prometheus_dir() -> Result<PathBuf, Error> {
    built_by("tools/build-prometheus.sh")
}

/// Runs a build script of this repository (each prints its output directory).
fn built_by(script: &str) -> Result<PathBuf, Error> {
    let script = crate::repo_path(script);
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(Error::io(&script))?;
    if !output.status.success() {
        return Err(Error::Build(format!(
            "{} exited with {}",
            script.display(),
            output.status
        )));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

fn state_root() -> PathBuf {
    std::env::temp_dir().join(STATE_DIR_NAME)
}

/// Starts `argv` under the watchdog (or, for the janitor, as given) in its own process group, so
/// a Ctrl-C aimed at the test run does not kill the watchdog before it can clean up.
fn spawn_supervised(
    dir: &Path,
    name: &'static str,
    argv: &[&str],
    watched: bool,
) -> Result<Supervised, Error> {
    let log = dir.join(format!("{name}.log"));
    let pidfile = dir.join(format!("{name}.pid"));
    let mut command = if watched {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(WATCHDOG)
            .arg(format!("watchdog-{name}"))
            .arg(&log)
            .arg(&pidfile)
            .args(argv);
        c
    } else {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        c
    };
    let mut watchdog = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(Error::io(Path::new(argv[0])))?;
    let stdin = watchdog.stdin.take();
    if watched {
        let list = dir.join("watchdogs");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&list)
            .map_err(Error::io(&list))?;
        writeln!(file, "{}", watchdog.id()).map_err(Error::io(&list))?;
    }
    Ok(Supervised {
        name,
        watchdog,
        stdin,
        log,
        pidfile,
    })
}

/// Reaps control planes whose owning test process is gone but whose servers still run (the
/// owner and its watchdogs were killed together), then removes their directories.
fn reap_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let owner_pid = owner
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if owner_pid.is_some_and(|pid| owner_record(pid).as_deref() == Some(owner.as_str())) {
            continue; // still running: another test binary's control plane
        }
        for name in BINARIES {
            let pid = fs::read_to_string(dir.join(format!("{name}.pid")))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(pid) = pid.filter(|&pid| runs_binary(pid, name)) {
                kill(pid, "KILL");
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// `"<pid> <start time>"`: the start time (field 22 of `/proc/<pid>/stat`) tells a live owner
/// from an unrelated process that reused its PID.
fn owner_record(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let started_at = after_comm.split_whitespace().nth(19)?;
    Some(format!("{pid} {started_at}"))
}

fn runs_binary(pid: u32, name: &str) -> bool {
    fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|exe| exe.file_name().is_some_and(|f| f == name))
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Free loopback ports, held until all are chosen so they differ, then released for the servers.
/// A port can in principle be taken in between; the servers then fail and say so in their log.
fn free_ports<const N: usize>(dir: &Path) -> Result<[u16; N], Error> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(Error::io(dir))?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(Error::io(dir))?.port();
    }
    Ok(ports)
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:x}{}",
        nanos % 0xfffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_record_of_this_process_is_stable_and_of_a_dead_pid_absent() {
        let me = std::process::id();
        assert_eq!(owner_record(me), owner_record(me));
        assert!(owner_record(me).is_some());
        assert!(owner_record(u32::MAX - 1).is_none());
    }
}
