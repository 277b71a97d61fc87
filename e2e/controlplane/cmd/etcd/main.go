// Command etcd is etcd's own server entry point (etcdmain), built at the version
// k8s.io/kubernetes v1.35 is tested against, so the control plane needs no prebuilt binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
