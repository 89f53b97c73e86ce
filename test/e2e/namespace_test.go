//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
)

// The e2e runs in its own PID and mount namespaces, with this test binary as their reaping
// init (PID 1). Why:
//   - Kubernetes' e2e specs that inspect the node (HostExec) run
//     `nsenter --mount=/rootfs/proc/1/ns/mnt` in a hostPID pod: /proc/1 must be a process in
//     kubelet's mount namespace, and on some machines the real PID 1 cannot even be opened.
//   - When PID 1 of a namespace ends, the kernel kills everything left in it, and the
//     namespace's mounts go with it: a crashed or interrupted run leaves no process and no
//     mount behind (teardown still detaches loop devices, which are not namespaced).
//   - Orphans (containerd shims, exec'd probes) are reaped instead of piling up as zombies.
//
// nsStage names the stage a process is in: unset (the host), "init" (PID 1 of the new
// namespaces), "tests" (the tests, child of init).
const nsStage = "CSI_RAWCOW_E2E_NS"

// inNamespaces runs the tests in new namespaces when called on the host and returns the
// exit code to leave with; ok is false when the caller is the tests' process itself.
func inNamespaces() (code int, ok bool) {
	switch os.Getenv(nsStage) {
	case "":
		if os.Geteuid() != 0 {
			return 0, false // setup() skips every test with the reason
		}
		return runChild("init", &syscall.SysProcAttr{
			Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS,
			Pdeathsig:  syscall.SIGKILL,
		}, false), true
	case "init":
		if err := initMounts(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: namespace init: %v\n", err)
			return 1, true
		}
		return runChild("tests", &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}, true), true
	}
	return 0, false
}

// initMounts cuts the new mount namespace off the host's propagation (nothing mounted here
// appears there), makes it shared inside (kubelet's Bidirectional propagation needs shared
// mounts) and mounts a /proc that shows the new PID namespace.
func initMounts() error {
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / rprivate: %w", err)
	}
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_SHARED, ""); err != nil {
		return fmt.Errorf("make / rshared: %w", err)
	}
	if err := syscall.Mount("proc", "/proc", "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	return nil
}

// runChild runs this test binary again with the same arguments at the given stage,
// forwards SIGINT and SIGTERM to it and returns its exit code. As init (reap) it waits for
// every process of the namespace, not only its child.
func runChild(stage string, attr *syscall.SysProcAttr, reap bool) int {
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), nsStage+"="+stage)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = attr
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: start the %s stage: %v\n", stage, err)
		return 1
	}
	go func() {
		for s := range sig {
			cmd.Process.Signal(s)
		}
	}()
	if !reap {
		err := cmd.Wait()
		if ee, ok := err.(*exec.ExitError); ok {
			return exitCode(ee.Sys().(syscall.WaitStatus))
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %s stage: %v\n", stage, err)
			return 1
		}
		return 0
	}
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: init: wait: %v\n", err)
			return 1
		}
		if pid == cmd.Process.Pid {
			return exitCode(ws)
		}
	}
}

func exitCode(ws syscall.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
