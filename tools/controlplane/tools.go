//go:build tools

// Package tools pins the control-plane binaries cloak's integration tests run.
// They are built by tools/build-control-plane.sh; nothing here is imported by cloak.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
