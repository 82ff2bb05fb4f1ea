// Command node is a multi-call binary holding the Kubernetes parts of the local cluster's node:
// kubelet, kube-scheduler and kube-proxy, at the same release as the control plane. It is a
// module of its own so that the control plane's build (and its cache key) stays as it is. It
// dispatches on the name it was started under, so each part runs as its own process through a
// symlink.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	switch name := filepath.Base(os.Args[0]); name {
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kube-proxy":
		os.Exit(cli.Run(proxy.NewProxyCommand()))
	default:
		fmt.Fprintf(os.Stderr, "node: started as %q; run it through a symlink named kubelet, kube-scheduler or kube-proxy\n", name)
		os.Exit(2)
	}
}
