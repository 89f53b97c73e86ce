// Package driver is the CSI plugin of csi-rawcow: the Identity, Controller and Node services
// over the layer-chain engine (pkg/cow), the node's image store (pkg/images) and the
// block-device presentation (pkg/blockdev). It speaks CSI and calls those packages; it makes
// no system call of its own beyond mounting, and never makes a path of a request's ID before
// the ID is validated.
package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
	"github.com/rawcow/csi-rawcow/pkg/images"
)

// DefaultName is the driver's CSI name.
const DefaultName = "rawcow.csi.io"

// TopologyKey is the topology segment that pins a volume, and its snapshots, to its node.
const TopologyKey = "topology.rawcow.csi/node"

// Config is the driver's configuration.
type Config struct {
	Name       string
	Version    string
	NodeID     string
	MaxVolumes int64 // per node, 0: no limit
}

// Driver implements the CSI Identity, Controller and Node services of one node.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	csi.UnimplementedGroupControllerServer

	cfg     Config
	store   *cow.Store
	images  *images.Store
	present blockdev.Service
	mounter *mount.SafeFormatAndMount
	exec    utilexec.Interface

	// locks serializes the RPCs on one volume or snapshot ID (retries of the CO overlap).
	locks keyedMutex
}

// New makes a driver over a store, an image store and a presentation service.
func New(cfg Config, store *cow.Store, imgs *images.Store, present blockdev.Service) (*Driver, error) {
	if cfg.NodeID == "" {
		return nil, errors.New("driver: a node id is required")
	}
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	ex := utilexec.New()
	return &Driver{
		cfg: cfg, store: store, images: imgs, present: present, exec: ex,
		mounter: &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: ex},
	}, nil
}

// Serve runs the gRPC server on l (see Listen) until ctx ends, then stops gracefully.
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	srv := grpc.NewServer(grpc.UnaryInterceptor(logRPC))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	csi.RegisterGroupControllerServer(srv, d)
	go func() {
		<-ctx.Done()
		klog.InfoS("Stopping the gRPC server")
		srv.GracefulStop()
	}()
	klog.InfoS("Serving CSI", "endpoint", l.Addr().String(), "name", d.cfg.Name, "version", d.cfg.Version, "node", d.cfg.NodeID)
	if err := srv.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// Listen opens a unix socket endpoint, removing a socket left by an earlier process.
func Listen(endpoint string) (net.Listener, error) {
	path := endpoint
	if strings.Contains(endpoint, "://") {
		u, err := url.Parse(endpoint)
		if err != nil || u.Scheme != "unix" {
			return nil, fmt.Errorf("endpoint %q: only unix:// endpoints are supported", endpoint)
		}
		path = u.Path
		if u.Host != "" {
			path = filepath.Join(u.Host, u.Path)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("endpoint %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("endpoint %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("endpoint %s: %w", path, err)
	}
	return l, nil
}

// logRPC logs every call (at verbosity 2, which the driver command runs at; the frequent
// probes and capability queries at 5) and every error, secrets stripped.
func logRPC(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	level := klog.Level(2)
	if strings.HasSuffix(info.FullMethod, "/Probe") || strings.HasSuffix(info.FullMethod, "Capabilities") {
		level = 5
	}
	klog.V(level).InfoS("GRPC call", "method", info.FullMethod, "request", protosanitizer.StripSecrets(req))
	resp, err := handler(ctx, req)
	if err != nil {
		klog.ErrorS(err, "GRPC error", "method", info.FullMethod)
	} else {
		klog.V(4).InfoS("GRPC response", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp))
	}
	return resp, err
}

// keyedMutex hands out one mutex per key, dropped when nobody holds it.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyedEntry
}

type keyedEntry struct {
	sync.Mutex
	users int
}

func (k *keyedMutex) lock(key string) func() {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyedEntry{}
	}
	e := k.locks[key]
	if e == nil {
		e = &keyedEntry{}
		k.locks[key] = e
	}
	e.users++
	k.mu.Unlock()
	e.Lock()
	return func() {
		e.Unlock()
		k.mu.Lock()
		if e.users--; e.users == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}
