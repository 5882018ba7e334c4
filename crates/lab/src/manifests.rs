//! What the lab applies besides `examples/lab`: CoreDNS as the cluster DNS, and the Helm values
//! that point cloak's chart at the lab's image.

use std::{path::Path, time::Duration};

use crate::{
    error::{Error, Result},
    images, lab_kubectl_jsonpath, layout,
    layout::Lab,
    sh,
};

/// `helm --set` values for the lab: the locally built image, never pulled, and the internet's
/// echo service as the address verification pods ask. The node component runs as the chart
/// ships it: each lab node binds directories of its own over the paths its hostPath volumes name.
pub const HELM_VALUES: [&str; 5] = [
    "image.repository=cloak.dev/lab/cloak",
    "image.tag=dev",
    "image.pullPolicy=Never",
    "operator.verifyIpUrl=http://203.0.113.10/ip",
    // The lab's server list is served by the echo service, over plain HTTP.
    "operator.allowHttpServerLists=true",
];

/// With the lab's Prometheus: the chart's monitoring objects too, checked against the
/// prometheus-operator's CRDs at install (no prometheus-operator runs: the lab's Prometheus has
/// its own configuration, the same jobs as those PodMonitors).
pub(crate) const MONITORING_VALUES: [&str; 4] = [
    "prometheus.podMonitors=true",
    "prometheus.scrapeExits=true",
    "prometheus.rules=true",
    "prometheus.dashboard=true",
];

/// CoreDNS in `kube-system`, Service `kube-dns` on the cluster DNS address, forwarding
/// everything outside the cluster to the internet's DNS.
pub(crate) fn coredns() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects:
- {{kind: ServiceAccount, name: coredns, namespace: kube-system}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
    .:53 {{
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }}
        forward . {upstream}
        cache 30
        loop
        reload
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata: {{labels: {{k8s-app: kube-dns}}}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
      - name: coredns
        image: {image}
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        readinessProbe: {{httpGet: {{path: /ready, port: 8181}}, periodSeconds: 2}}
        livenessProbe: {{httpGet: {{path: /health, port: 8080}}}}
        resources: {{requests: {{cpu: 10m, memory: 32Mi}}, limits: {{memory: 128Mi}}}}
        volumeMounts: [{{name: config, mountPath: /etc/coredns}}]
      volumes: [{{name: config, configMap: {{name: coredns}}}}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  clusterIP: {dns}
  selector: {{k8s-app: kube-dns}}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
"#,
        upstream = layout::INTERNET_DNS,
        image = images::COREDNS_IMAGE,
        dns = layout::CLUSTER_DNS,
    )
}

/// Replaces every `{{uid <kind>/<name>}}` in an example (an ownerReference's uid, which only
/// exists once the owner does) with the uid of that object in the demo namespace.
pub(crate) fn fill_owner_uids(lab: &Lab, kubectl: &Path, yaml: &str) -> Result<String> {
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml;
    while let Some(start) = rest.find("{{uid ") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 6..];
        let end = after
            .find("}}")
            .ok_or_else(|| Error::Other("unterminated {{uid ...}} in an example".into()))?;
        let object = after[..end].trim();
        let uid = sh::wait_for(
            &format!("{object} to exist"),
            Duration::from_mins(1),
            Duration::from_millis(250),
            || {
                lab_kubectl_jsonpath(
                    lab,
                    kubectl,
                    &["-n", crate::supervisor::DEMO_NAMESPACE, "get", object],
                    "{.metadata.uid}",
                )
                .map(|uid| (!uid.is_empty()).then_some(uid))
                .map_err(|e| e.to_string())
            },
        )?;
        out.push_str(&uid);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}
