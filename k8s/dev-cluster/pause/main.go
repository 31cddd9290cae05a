// The pod sandbox's process (what registry.k8s.io/pause is): it holds the pod's namespaces, reaps
// orphans as PID 1, and exits on SIGINT/SIGTERM. No registry is reachable here, so the dev
// cluster builds it and imports it into its containerd.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			if pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 || err != nil {
				break
			}
		}
	}
}
