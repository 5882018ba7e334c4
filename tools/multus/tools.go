//go:build tools

// Package tools pins Multus, the CNI meta-plugin `cloak lab up --cni multus` runs in front
// of the bridge plugin (its thin plugin, cmd/multus). Built by tools/build-lab.sh; nothing here is
// imported by cloak.
package tools

import (
	_ "gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/multus"
)
