//go:build tools

// Package tools pins the Kubernetes binaries cloak runs: the control plane its integration tests
// start (etcd, kube-apiserver, kube-controller-manager) and the node and scheduler binaries of
// `cloak lab` (kube-scheduler, kubelet, kube-proxy). They are built by
// tools/build-control-plane.sh; nothing here is imported by cloak.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
