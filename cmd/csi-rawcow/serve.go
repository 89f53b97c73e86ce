package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// defaultRunDir holds the FUSE mount and the control socket of a node's server.
const defaultRunDir = "/run/csi-rawcow"

func runDirDefault() string {
	if d := os.Getenv("CSI_RAWCOW_RUN"); d != "" {
		return d
	}
	return defaultRunDir
}

func storeDirDefault() string {
	if d := os.Getenv("CSI_RAWCOW_STORE"); d != "" {
		return d
	}
	return "/var/lib/csi-rawcow/store"
}

// serveMain runs the block-device server in the foreground until SIGINT or SIGTERM.
func serveMain(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	store := fs.String("store", storeDirDefault(), "store directory (env CSI_RAWCOW_STORE)")
	runDir := fs.String("run-dir", runDirDefault(), "directory for the FUSE mount and the control socket (env CSI_RAWCOW_RUN)")
	maxBackground := fs.Int("max-background", 0, "FUSE requests in flight (0: the measured default)")
	debug := fs.Bool("fuse-debug", false, "log every FUSE request")
	transport := fs.String("fuse-transport", blockdev.TransportAuto, "how FUSE requests reach the server: auto (io-uring where the kernel has it, else dev-fuse), io-uring (rings, one per CPU; Linux 6.14+, turns the fuse module's enable_uring on; faster small I/O, slower large reads, see docs/PERFORMANCE.md), or dev-fuse")
	klog.InitFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := blockdev.BecomeIOFlusher(); err != nil {
		klog.InfoS("Serving without PR_SET_IO_FLUSHER: under memory pressure, writeback to attached volumes can stall", "err", err)
	}
	st, err := cow.OpenStore(*store)
	if err != nil {
		klog.ErrorS(err, "Cannot open the store")
		return 1
	}
	srv, err := blockdev.NewServer(st, *runDir, blockdev.Options{MaxBackground: *maxBackground, Debug: *debug, Transport: *transport})
	if err != nil {
		klog.ErrorS(err, "Cannot start the server")
		return 1
	}
	ctl, err := srv.ServeControl()
	if err != nil {
		klog.ErrorS(err, "Cannot open the control socket")
		srv.Close()
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	klog.InfoS("Ready", "runDir", *runDir)
	s := <-sig
	klog.InfoS("Shutting down", "signal", s.String())
	ctl.Close()
	if err := srv.Close(); err != nil {
		klog.ErrorS(err, "Shutdown")
		return 1
	}
	return 0
}

// attachMain asks the node's server to attach a volume or snapshot and prints the device.
func attachMain(args []string) int {
	fs := flag.NewFlagSet("attach", flag.ContinueOnError)
	runDir := fs.String("run-dir", runDirDefault(), "the server's run directory (env CSI_RAWCOW_RUN)")
	readOnly := fs.Bool("read-only", false, "attach read-only (snapshots always are)")
	presentation := fs.String("presentation", blockdev.PresentAuto, "auto (composed where the store's file system shares blocks), merged (FUSE) or composed (plain loop on the composed top)")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: csi-rawcow attach [--read-only] [--presentation auto|merged|composed] [--run-dir DIR] NAME")
		return 2
	}
	c, err := blockdev.Dial(*runDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "csi-rawcow attach: %v\n", err)
		return 1
	}
	defer c.Close()
	a, err := c.Attach(fs.Arg(0), blockdev.AttachOptions{ReadOnly: *readOnly, Presentation: *presentation})
	if err != nil {
		fmt.Fprintf(os.Stderr, "csi-rawcow attach: %v\n", err)
		return 1
	}
	fmt.Println(a.Device)
	return 0
}

// detachMain asks the node's server to detach a name.
func detachMain(args []string) int {
	fs := flag.NewFlagSet("detach", flag.ContinueOnError)
	runDir := fs.String("run-dir", runDirDefault(), "the server's run directory (env CSI_RAWCOW_RUN)")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: csi-rawcow detach [--run-dir DIR] NAME")
		return 2
	}
	c, err := blockdev.Dial(*runDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "csi-rawcow detach: %v\n", err)
		return 1
	}
	defer c.Close()
	if err := c.Detach(fs.Arg(0)); err != nil {
		fmt.Fprintf(os.Stderr, "csi-rawcow detach: %v\n", err)
		return 1
	}
	return 0
}
