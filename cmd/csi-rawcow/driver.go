package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
	"github.com/rawcow/csi-rawcow/pkg/driver"
	"github.com/rawcow/csi-rawcow/pkg/images"
	"github.com/rawcow/csi-rawcow/pkg/snapshotlabel"
)

// driverMain runs the CSI plugin until SIGINT or SIGTERM.
func driverMain(args []string) int {
	fs := flag.NewFlagSet("driver", flag.ContinueOnError)
	endpoint := fs.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint")
	nodeID := fs.String("nodeid", "", "this node's name (default: the host name)")
	root := fs.String("root", "/var/lib/csi-rawcow", "root directory: ROOT/store holds the volumes, ROOT/images the base images")
	runDir := fs.String("run-dir", runDirDefault(), "the presentation server's run directory (env CSI_RAWCOW_RUN)")
	serverMode := fs.String("server", "auto", "presentation server: embedded (in this process), external (`csi-rawcow serve` beside it) or auto (external if one runs)")
	name := fs.String("drivername", driver.DefaultName, "CSI driver name")
	transport := fs.String("fuse-transport", blockdev.TransportAuto, "embedded server: how FUSE requests reach it (auto, io-uring or dev-fuse; see `csi-rawcow serve -h`)")
	maxVolumes := fs.Int64("max-volumes", 0, "volumes per node, 0 for no limit")
	labelContents := fs.Bool("label-snapshot-contents", false, "in a pod: label pre-provisioned VolumeSnapshotContents of this node's snapshots for its csi-snapshotter --node-deployment (needs get, list, watch, patch on volumesnapshotcontents)")
	klog.InitFlags(fs)
	fs.Set("v", "2") // every CSI call is logged; -v overrides
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *serverMode != "external" {
		if err := blockdev.BecomeIOFlusher(); err != nil {
			klog.InfoS("Running without PR_SET_IO_FLUSHER: under memory pressure, writeback to attached volumes can stall", "err", err)
		}
	}
	if *nodeID == "" {
		h, err := os.Hostname()
		if err != nil {
			klog.ErrorS(err, "No --nodeid and no host name")
			return 2
		}
		*nodeID = h
	}
	st, err := cow.OpenStore(filepath.Join(*root, "store"))
	if err != nil {
		klog.ErrorS(err, "Cannot open the store")
		return 1
	}
	// State comes from disk: finish what a crash interrupted (stray files of a transaction
	// cut short, merges held back) before serving.
	if err := st.Collect(); err != nil {
		// Serve anyway: Probe, health and the RPCs say what is wrong, a crash loop would not.
		klog.ErrorS(err, "Cannot tidy the store")
	}
	imgs, err := images.Open(filepath.Join(*root, "images"))
	if err != nil {
		klog.ErrorS(err, "Cannot open the image store")
		return 1
	}
	present, stop, err := presentation(*serverMode, st, *runDir, blockdev.Options{Transport: *transport})
	if err != nil {
		klog.ErrorS(err, "No presentation server")
		return 1
	}
	defer stop()
	d, err := driver.New(driver.Config{Name: *name, Version: version, NodeID: *nodeID, MaxVolumes: *maxVolumes}, st, imgs, present)
	if err != nil {
		klog.ErrorS(err, "Cannot start the driver")
		return 1
	}
	l, err := driver.Listen(*endpoint)
	if err != nil {
		klog.ErrorS(err, "Cannot listen")
		return 1
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	if *labelContents {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			klog.ErrorS(err, "--label-snapshot-contents needs the pod's service account")
			return 1
		}
		client, err := dynamic.NewForConfig(cfg)
		if err != nil {
			klog.ErrorS(err, "Kubernetes client")
			return 1
		}
		labeler := &snapshotlabel.Labeler{Client: client, Driver: *name, Node: *nodeID, Owns: d.HasSnapshot}
		go labeler.Run(ctx)
	}
	if err := d.Serve(ctx, l); err != nil {
		klog.ErrorS(err, "CSI server failed")
		return 1
	}
	// (what is left is emptied at the next start anyway)
	if err := st.WaitTrash(); err != nil {
		klog.ErrorS(err, "Emptying the store's trash")
	}
	return 0
}

// presentation connects to a server running beside the driver, or starts one in this
// process. An embedded server's devices stop with the driver; an external one outlives
// driver restarts.
func presentation(mode string, st *cow.Store, runDir string, opts blockdev.Options) (blockdev.Service, func(), error) {
	if mode == "external" || mode == "auto" {
		c, err := blockdev.Dial(runDir)
		if err == nil {
			klog.InfoS("Using the presentation server beside the driver", "runDir", runDir)
			return c, func() { c.Close() }, nil
		}
		if mode == "external" {
			return nil, nil, err
		}
	} else if mode != "embedded" {
		return nil, nil, errors.New("--server must be embedded, external or auto")
	}
	srv, err := blockdev.NewServer(st, runDir, opts)
	if err != nil {
		return nil, nil, err
	}
	ctl, err := srv.ServeControl()
	if err != nil {
		srv.Close()
		return nil, nil, err
	}
	return srv, func() {
		ctl.Close()
		if err := srv.Close(); err != nil {
			klog.ErrorS(err, "Closing the presentation server")
		}
	}, nil
}
