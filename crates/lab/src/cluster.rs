//! Building the cluster: the lab's networks, the control plane, and each node (a mount
//! namespace holder, containerd, kubelet, kube-proxy). Every step is a command whose failure
//! names what failed; the processes belong to the supervisor's [`Procs`].

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    certs,
    error::{Error, Result},
    layout::{self, Lab},
    procs::Procs,
    reap, sh,
    supervisor::Cni,
};

/// Where the binaries come from: the Kubernetes binaries (`tools/build-control-plane.sh`) and
/// the rest (`tools/build-lab.sh`), plus `kubectl`.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kubernetes: PathBuf,
    pub lab: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl Binaries {
    fn kube(&self, name: &str) -> String {
        self.kubernetes.join(name).to_string_lossy().into_owned()
    }

    fn lab(&self, name: &str) -> String {
        self.lab.join(name).to_string_lossy().into_owned()
    }

    /// Fails with what is missing, before anything is built.
    pub fn check(&self, cni: Cni) -> Result<()> {
        let mut missing = Vec::new();
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
        ] {
            if !self.kubernetes.join(name).is_file() {
                missing.push(self.kubernetes.join(name));
            }
        }
        let mut lab = vec![
            "containerd",
            "containerd-shim-runc-v2",
            "ctr",
            "coredns",
            "pause",
        ];
        if cni == Cni::Multus {
            lab.push("multus");
        }
        for name in lab {
            if !self.lab.join(name).is_file() {
                missing.push(self.lab.join(name));
            }
        }
        for path in [&self.kubectl, &self.helm] {
            if !path.is_file() {
                missing.push(path.clone());
            }
        }
        for tool in [
            "/usr/sbin/runc",
            "/usr/lib/cni/bridge",
            "/usr/lib/cni/host-local",
            "/usr/lib/cni/loopback",
            "/usr/bin/setpriv",
            "/usr/bin/nsenter",
            "/usr/bin/unshare",
            "/usr/sbin/openvpn",
            "/usr/sbin/nft",
        ] {
            if !Path::new(tool).exists() {
                missing.push(PathBuf::from(tool));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::Other(format!(
            "missing: {}; tools/lab.sh builds and installs everything the lab runs",
            missing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// The namespaces, the lan bridge and every link, address and route of a lab of `nodes` nodes.
pub(crate) fn network(lab: &Lab, nodes: u8) -> Result<()> {
    let lan = lab.netns("lan");
    let mut roles: Vec<(String, String)> = vec![
        ("net".into(), layout::GATEWAY.into()),
        ("cp".into(), layout::API_SERVER.into()),
        ("host".into(), layout::HOST.into()),
    ];
    roles.extend((1..=nodes).map(|k| (layout::node_name(k), layout::node_ip(k))));
    for ns in std::iter::once("lan".to_owned())
        .chain(roles.iter().map(|(r, _)| r.clone()))
        .chain(std::iter::once("ext".to_owned()))
    {
        let name = lab.netns(&ns);
        sh::run(&["ip", "netns", "add", &name])?;
        sh::ip(&name, &["link", "set", "lo", "up"])?;
    }
    sh::ip(&lan, &["link", "add", "br0", "type", "bridge"])?;
    sh::ip(&lan, &["link", "set", "br0", "up"])?;
    for (role, addr) in &roles {
        let ns = lab.netns(role);
        let port = format!("l-{role}");
        sh::ip(
            &lan,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "lan0", "netns", &ns,
            ],
        )?;
        sh::ip(&lan, &["link", "set", &port, "master", "br0", "up"])?;
        sh::ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "lan0"])?;
        sh::ip(&ns, &["link", "set", "lan0", "up"])?;
        if role != "net" {
            sh::ip(&ns, &["route", "add", "default", "via", layout::GATEWAY])?;
        }
    }
    // The internet: the echo service and DNS on its loopback, forwarding for providers.
    let net = lab.netns("net");
    for addr in [layout::ECHO, layout::INTERNET_DNS] {
        sh::ip(&net, &["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
    }
    sh::ip(
        &net,
        &[
            "addr",
            "add",
            &format!("{}/128", layout::ECHO6),
            "dev",
            "lo",
        ],
    )?;
    sh::sysctl(&net, "net.ipv4.ip_forward", "1")?;
    sh::sysctl(&net, "net.ipv6.conf.all.forwarding", "1")?;
    // The control plane reaches pods (API server → webhooks, logs, exec) through their nodes,
    // and Services through node 1's kube-proxy.
    let cp = lab.netns("cp");
    for k in 1..=nodes {
        sh::ip(
            &cp,
            &[
                "route",
                "add",
                &layout::node_pod_cidr(k),
                "via",
                &layout::node_ip(k),
            ],
        )?;
    }
    sh::ip(
        &cp,
        &[
            "route",
            "add",
            layout::SERVICE_CIDR,
            "via",
            &layout::node_ip(1),
        ],
    )?;
    // Nodes: forwarding, routes to the other nodes' pods, and masquerade of pod traffic that
    // leaves the cluster (what a cloud node's SNAT does).
    for k in 1..=nodes {
        let ns = lab.netns(&layout::node_name(k));
        sh::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        sh::sysctl(&ns, "net.ipv4.conf.all.rp_filter", "0")?;
        sh::sysctl(&ns, "net.ipv4.conf.default.rp_filter", "0")?;
        // The external network lies behind the host (as VMs reach the LAN through theirs):
        // replies to what `cloak portfwd` forwards go back the way they came.
        sh::ip(
            &ns,
            &["route", "add", layout::EXTERNAL_NET, "via", layout::HOST],
        )?;
        for other in (1..=nodes).filter(|&o| o != k) {
            sh::ip(
                &ns,
                &[
                    "route",
                    "add",
                    &layout::node_pod_cidr(other),
                    "via",
                    &layout::node_ip(other),
                ],
            )?;
        }
        sh::nft(
            &ns,
            &format!(
                "table ip cloak_lab_node {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat + 10; policy accept;\n    ip saddr {pods} ip daddr != {{ {pods}, {services}, {lan}.0/24 }} oifname \"lan0\" masquerade\n  }}\n}}\n",
                pods = layout::POD_CIDR,
                services = layout::SERVICE_CIDR,
                lan = layout::LAN_PREFIX,
            ),
        )?;
    }
    // The host and the external client behind it.
    let host = lab.netns("host");
    let ext = lab.netns("ext");
    sh::ip(
        &host,
        &[
            "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &ext,
        ],
    )?;
    sh::ip(
        &host,
        &[
            "addr",
            "add",
            &format!("{}/24", layout::HOST_EXTERNAL),
            "dev",
            "ext0",
        ],
    )?;
    sh::ip(&host, &["link", "set", "ext0", "up"])?;
    sh::ip(
        &ext,
        &[
            "addr",
            "add",
            &format!("{}/24", layout::EXTERNAL_CLIENT),
            "dev",
            "eth0",
        ],
    )?;
    sh::ip(&ext, &["link", "set", "eth0", "up"])?;
    sh::ip(
        &ext,
        &["route", "add", "default", "via", layout::HOST_EXTERNAL],
    )?;
    sh::sysctl(&host, "net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// The internet's DNS server: CoreDNS answering for `lab.test` (the echo service, every VPN
/// server) and nothing else.
pub(crate) fn internet_dns(lab: &Lab, bins: &Binaries, procs: &mut Procs) -> Result<()> {
    let dir = lab.dir().join("dns");
    fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let mut hosts = format!("    {} echo.{}\n", layout::ECHO, layout::INTERNET_ZONE);
    for p in layout::PROVIDERS {
        for k in 1..=p.servers {
            let _ = writeln!(hosts, "    {} {}", p.server(k), p.server_name(k));
        }
    }
    let corefile = format!(
        "{zone}:53 {{\n  bind {ip}\n  hosts {{\n{hosts}  }}\n  log\n  errors\n}}\n.:53 {{\n  bind {ip}\n  log\n  errors\n}}\n",
        zone = layout::INTERNET_ZONE,
        ip = layout::INTERNET_DNS,
    );
    let path = dir.join("Corefile");
    fs::write(&path, corefile).map_err(Error::io(&path))?;
    procs.spawn(
        "internet-dns",
        &sh::in_netns(
            &lab.netns("net"),
            [
                bins.lab("coredns"),
                "-conf".into(),
                path.to_string_lossy().into_owned(),
            ],
        ),
        Some(&dir),
    )?;
    Ok(())
}

/// Certificates, kubeconfigs, etcd, kube-apiserver, kube-controller-manager and kube-scheduler
/// in the control-plane namespace. Returns once the API server is ready.
pub(crate) fn control_plane(
    lab: &Lab,
    bins: &Binaries,
    procs: &mut Procs,
    proxy_port: u16,
) -> Result<()> {
    let pki = lab.dir().join("pki");
    fs::create_dir_all(&pki).map_err(Error::io(&pki))?;
    let certs = certs::generate(&pki)?;
    certs::write_private(
        &lab.kubeconfig(),
        &certs::kubeconfig(&format!("https://127.0.0.1:{proxy_port}"), &certs),
    )?;
    let cluster_kubeconfig = cluster_kubeconfig(lab);
    certs::write_private(
        &cluster_kubeconfig,
        &certs::kubeconfig(
            &format!("https://{}:{}", layout::API_SERVER, layout::API_PORT),
            &certs,
        ),
    )?;
    let p = |name: &str| pki.join(name).to_string_lossy().into_owned();
    let d = |name: &str| lab.dir().join(name).to_string_lossy().into_owned();
    let kc = cluster_kubeconfig.to_string_lossy().into_owned();
    let cp = lab.netns("cp");
    let in_cp = |argv: Vec<String>| sh::in_netns(&cp, argv);
    procs.spawn(
        "etcd",
        &in_cp(vec![
            bins.kube("etcd"),
            "--name=lab".into(),
            format!("--data-dir={}", d("etcd")),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=lab=http://127.0.0.1:2380".into(),
            "--listen-metrics-urls=http://127.0.0.1:2381".into(),
            // The lab's data is disposable; fsync only slows every write.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]),
        None,
    )?;
    procs.spawn(
        "kube-apiserver",
        &in_cp(vec![
            bins.kube("kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379".into(),
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={}", layout::API_SERVER),
            format!("--secure-port={}", layout::API_PORT),
            format!("--cert-dir={}", p("apiserver-certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-cluster-ip-range={}", layout::SERVICE_CIDR),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--v=0".into(),
        ]),
        None,
    )?;
    let kubectl = bins.kubectl.to_string_lossy().into_owned();
    let admin = lab.kubeconfig().to_string_lossy().into_owned();
    sh::wait_for(
        "kube-apiserver ready",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || {
            procs.check_all().map_err(|e| e.to_string())?;
            match sh::run(&[&kubectl, "--kubeconfig", &admin, "get", "--raw", "/readyz"]) {
                Ok(body) if body.trim() == "ok" => Ok(Some(())),
                Ok(body) => Err(body),
                Err(e) => Err(e.to_string()),
            }
        },
    )?;
    procs.spawn(
        "kube-controller-manager",
        &in_cp(vec![
            bins.kube("kube-controller-manager"),
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--cert-dir={}", p("kcm-certs")),
            "--leader-elect=false".into(),
            "--controllers=*".into(),
            "--use-service-account-credentials=false".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--v=0".into(),
        ]),
        None,
    )?;
    procs.spawn(
        "kube-scheduler",
        &in_cp(vec![
            bins.kube("kube-scheduler"),
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=false".into(),
            "--v=0".into(),
        ]),
        None,
    )?;
    Ok(())
}

/// The kubeconfig for components inside the lab: the API server at its lan address.
pub(crate) fn cluster_kubeconfig(lab: &Lab) -> PathBuf {
    lab.dir().join("cluster.kubeconfig")
}

/// The mount namespace holder of a node (NODENOTES trap 4): in the node's network namespace, a
/// new mount namespace (slave propagation: the host's mounts reach it, its own never reach the
/// host) with a sysfs of the node's network namespace, the host's cgroup tree bound back under
/// it, and the node's private directories bound over the paths the kubelet, libcni and
/// containerd hard-code, and that cloak's node component reaches by its hostPath volumes
/// (`/etc/cni/net.d`, `/opt/cni/bin`, `/run/cloak`, `/var/lib/cloak/node`): two nodes never share
/// them, and nothing is written into the host's own (binding may leave empty directories at those
/// paths on the host). Argument: the node's directory.
const HOLDER: &str = r#"
set -eu
d=$1
mkdir -p "$d/cgroup"
mount --rbind /sys/fs/cgroup "$d/cgroup"
mount -t sysfs sysfs /sys
mount --rbind "$d/cgroup" /sys/fs/cgroup
for p in /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/containerd \
    /run/cloak /var/lib/cloak/node; do
  mkdir -p "$d/root$p" "$p"
  mount --bind "$d/root$p" "$p"
done
# The CNI directories a node component finds at their usual places (cloak's DaemonSet installs
# its plugin there): the node's own configuration and plugin directories.
mkdir -p /etc/cni/net.d /opt/cni/bin
mount --bind "$d/cni" /etc/cni/net.d
mount --bind "$d/cni-bin" /opt/cni/bin
echo ready > "$d/holder.ready"
exec sleep infinity
"#;

/// Node `k`: cgroups, holder, containerd (with the lab's images), kubelet and kube-proxy.
pub(crate) fn node(
    lab: &Lab,
    bins: &Binaries,
    procs: &mut Procs,
    k: u8,
    cni: Cni,
    images: &[PathBuf],
) -> Result<()> {
    let name = layout::node_name(k);
    let dir = lab.node_dir(k);
    for sub in ["", "cni", "cni-bin", "containerd"] {
        let d = dir.join(sub);
        fs::create_dir_all(&d).map_err(Error::io(&d))?;
    }
    let cgroup = lab.cgroup(k);
    for hierarchy in reap::hierarchies() {
        let path = hierarchy.join(&cgroup);
        fs::create_dir_all(&path).map_err(Error::io(&path))?;
        // A new cpuset cgroup has no CPUs and no memory nodes until given its parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(hierarchy.join(file)) {
                fs::write(path.join(file), value.trim()).map_err(Error::io(path.join(file)))?;
            }
        }
    }
    let netns = lab.netns(&name);
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let holder = procs.spawn(
        &format!("{name}-holder"),
        &sh::in_netns(
            &netns,
            [
                "unshare".into(),
                "--mount".into(),
                "--propagation".into(),
                "slave".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                HOLDER.into(),
                "holder".into(),
                d(""),
            ],
        ),
        None,
    )?;
    let ready = dir.join("holder.ready");
    sh::wait_for(
        &format!("{name}: mount namespace"),
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            procs.check_all().map_err(|e| e.to_string())?;
            Ok(ready.exists().then_some(()))
        },
    )?;
    let in_node = |argv: Vec<String>| {
        let mut full = vec![
            "nsenter".to_owned(),
            "-t".to_owned(),
            holder.to_string(),
            "-m".to_owned(),
            "-n".to_owned(),
            "--".to_owned(),
        ];
        full.extend(argv);
        full
    };

    let socket = d("containerd/containerd.sock");
    let config = containerd_config(&dir, &socket);
    fs::write(dir.join("containerd.toml"), config)
        .map_err(Error::io(dir.join("containerd.toml")))?;
    fs::write(dir.join("cni/10-lab.conflist"), cni_list(k).to_string())
        .map_err(Error::io(dir.join("cni/10-lab.conflist")))?;
    if cni == Cni::Multus {
        // containerd reads the first file of the directory (`max_conf_num = 1`): Multus's, which
        // names the bridge list as the cluster network. The binary goes into the node's own
        // plugin directory, as Multus's DaemonSet puts it there.
        let bin = dir.join("cni-bin/multus");
        let _ = fs::remove_file(&bin);
        std::os::unix::fs::symlink(bins.lab.join("multus"), &bin).map_err(Error::io(&bin))?;
        let conf = dir.join("cni/00-multus.conf");
        fs::write(&conf, multus_config(lab, k)).map_err(Error::io(&conf))?;
    }
    // containerd finds its shim on PATH.
    let path_env = format!(
        "PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        bins.lab.display()
    );
    procs.spawn(
        &format!("{name}-containerd"),
        &in_node(vec![
            "env".into(),
            path_env,
            bins.lab("containerd"),
            "--config".into(),
            d("containerd.toml"),
        ]),
        None,
    )?;
    let ctr = |args: &[&str]| {
        let mut argv = in_node(vec![
            bins.lab("ctr"),
            "--address".into(),
            socket.clone(),
            "-n".into(),
            "k8s.io".into(),
        ]);
        argv.extend(args.iter().map(|s| (*s).to_owned()));
        sh::run(&argv)
    };
    sh::wait_for(
        &format!("{name}: containerd"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            procs.check_all().map_err(|e| e.to_string())?;
            ctr(&["version"])
                .map(|_| Some(()))
                .map_err(|e| e.to_string())
        },
    )?;
    for image in images {
        ctr(&["images", "import", "--local", &image.to_string_lossy()])?;
    }

    let kubelet_config = kubelet_config(lab, k, &socket);
    fs::write(dir.join("kubelet.yaml"), kubelet_config)
        .map_err(Error::io(dir.join("kubelet.yaml")))?;
    fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {}\n", layout::INTERNET_DNS),
    )
    .map_err(Error::io(dir.join("resolv.conf")))?;
    let kc = cluster_kubeconfig(lab).to_string_lossy().into_owned();
    procs.spawn(
        &format!("{name}-kubelet"),
        &in_node(vec![
            bins.kube("kubelet"),
            format!("--config={}", d("kubelet.yaml")),
            format!("--kubeconfig={kc}"),
            format!("--node-ip={}", layout::node_ip(k)),
            format!("--hostname-override={name}"),
            "--v=0".into(),
        ]),
        None,
    )?;
    procs.spawn(
        &format!("{name}-kube-proxy"),
        &in_node(vec![
            bins.kube("kube-proxy"),
            format!("--kubeconfig={kc}"),
            format!("--hostname-override={name}"),
            "--proxy-mode=nftables".into(),
            format!("--cluster-cidr={}", layout::POD_CIDR),
            // 0 leaves the global conntrack sysctls alone (NODENOTES trap 7).
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            // Pods on one bridge reach each other's Services without br_netfilter this way.
            "--masquerade-all".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
            "--v=0".into(),
        ]),
        None,
    )?;
    Ok(())
}

fn containerd_config(dir: &Path, socket: &str) -> String {
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "warn"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  # NODENOTES trap 1: no CAP_SYS_RESOURCE in this sandbox.
  restrict_oom_score_adj = true
  # NODENOTES trap 5: pod network namespaces stay under the state directory.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    # The node's plugin directory first (cloak's plugin is copied there), then Debian's plugins.
    bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
    conf_dir = "{cni}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        pause = crate::images::PAUSE_IMAGE,
        cni = d("cni"),
    )
}

/// The node's primary network: the bridge plugin's list.
fn cni_list(k: u8) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            // The node's own nftables table masquerades what leaves the cluster; the plugin's
            // would also rewrite pod-to-pod traffic between nodes.
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": layout::node_pod_cidr(k)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    })
}

/// Multus's thin plugin in front of the bridge list, as Multus's DaemonSet writes it
/// (`--multus-conf-file=auto`): the primary list copied inline as the first delegate, once, when
/// the node starts (cloak's node component later adds its plugin to that copy). Multus reads the
/// pod through the API server (its annotations) and finds the delegate's plugins on the
/// runtime's `CNI_PATH`.
fn multus_config(lab: &Lab, k: u8) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "multus-cni-network",
        "type": "multus",
        "binDir": "/opt/cni/bin",
        "kubeconfig": cluster_kubeconfig(lab),
        "logFile": lab.node_dir(k).join("multus.log"),
        "logLevel": "error",
        "delegates": [cni_list(k)],
    })
    .to_string()
}

fn kubelet_config(lab: &Lab, k: u8, socket: &str) -> String {
    let dir = lab.node_dir(k);
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# NODENOTES trap 2: cgroup v1 hosts, cgroupfs, a cgroup root of the lab's own.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
# NODENOTES trap 1: the kubelet may not lower its own OOM score here.
oomScoreAdj: 0
containerRuntimeEndpoint: unix://{socket}
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization:
  mode: AlwaysAllow
clusterDNS: [{dns}]
clusterDomain: cluster.local
resolvConf: {resolv}
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
# The lab's images are imported, never pulled: image GC must never remove them, and the
# host's disk filling up must not evict the lab's pods.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
shutdownGracePeriod: 0s
# How soon a changed Secret reaches a mounted volume (default 1m): rotated credentials reach
# a running agent within ~10 s.
syncFrequency: 10s
"#,
        cgroup = lab.cgroup(k),
        dns = layout::CLUSTER_DNS,
        resolv = dir.join("resolv.conf").display(),
    )
}
