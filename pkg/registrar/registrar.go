// Package registrar registers a CSI node plugin with kubelet through the kubelet
// plugin-registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1), what the
// node-driver-registrar sidecar does: it serves a gRPC socket, DRIVER-reg.sock, in kubelet's
// plugins_registry directory; kubelet's plugin watcher finds it, asks GetInfo for the driver's
// name and the path of its CSI socket on the host, registers the driver (NodeGetInfo, the
// CSINode object, the node's topology labels) and reports the outcome with
// NotifyRegistrationStatus. Removing the socket makes kubelet deregister the driver.
package registrar

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// SupportedVersions are the CSI versions reported to kubelet; kubelet accepts a CSI plugin
// that supports any 1.x.
var SupportedVersions = []string{"1.0.0"}

// ErrRegistrationFailed is returned by Run when kubelet reports that it could not register
// the plugin. The caller should exit non-zero: the container restarts and kubelet retries,
// as with node-driver-registrar.
var ErrRegistrationFailed = errors.New("kubelet could not register the plugin")

// Config describes one registration.
type Config struct {
	// DriverName is the CSI driver's name, as its GetPluginInfo reports it.
	DriverName string
	// Endpoint is the path of the driver's CSI socket as kubelet sees it on the host
	// (node-driver-registrar's --kubelet-registration-path).
	Endpoint string
	// RegistrationDir is kubelet's plugins_registry directory as this process sees it
	// (--plugin-registration-path, /registration in a container).
	RegistrationDir string
	// ProbeFile, if set, is created when kubelet reports a successful registration and
	// removed at start and at exit, for an exec liveness probe (ProbeRegistered).
	ProbeFile string
	// SupportedVersions defaults to SupportedVersions.
	SupportedVersions []string
}

// Server answers kubelet's plugin watcher for one driver.
type Server struct {
	registerapi.UnimplementedRegistrationServer

	cfg        Config
	registered atomic.Bool
	failedOnce sync.Once
	failed     chan string // kubelet's error, once
}

// New checks cfg and makes a server.
func New(cfg Config) (*Server, error) {
	if cfg.DriverName == "" {
		return nil, errors.New("registrar: no driver name")
	}
	if strings.ContainsAny(cfg.DriverName, "/\x00") || cfg.DriverName == "." || cfg.DriverName == ".." {
		return nil, fmt.Errorf("registrar: driver name %q cannot name a socket", cfg.DriverName)
	}
	if cfg.Endpoint == "" {
		return nil, errors.New("registrar: no kubelet registration path (the driver's socket on the host)")
	}
	if !filepath.IsAbs(strings.TrimPrefix(cfg.Endpoint, "unix://")) {
		return nil, fmt.Errorf("registrar: kubelet registration path %q is not absolute", cfg.Endpoint)
	}
	if cfg.RegistrationDir == "" {
		return nil, errors.New("registrar: no plugin registration directory")
	}
	if len(cfg.SupportedVersions) == 0 {
		cfg.SupportedVersions = SupportedVersions
	}
	return &Server{cfg: cfg, failed: make(chan string, 1)}, nil
}

// SocketPath is the registration socket: RegistrationDir/DRIVER-reg.sock.
func (s *Server) SocketPath() string { return SocketPath(s.cfg.RegistrationDir, s.cfg.DriverName) }

// SocketPath is the registration socket of driver in kubelet's registration directory dir.
func SocketPath(dir, driver string) string { return filepath.Join(dir, driver+"-reg.sock") }

// Registered tells whether kubelet has reported a successful registration since the start.
func (s *Server) Registered() bool { return s.registered.Load() }

// GetInfo is kubelet's first call: who is the plugin and where is its CSI socket.
func (s *Server) GetInfo(ctx context.Context, req *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.V(2).InfoS("GetInfo from kubelet", "driver", s.cfg.DriverName, "endpoint", s.cfg.Endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.cfg.DriverName,
		Endpoint:          s.cfg.Endpoint,
		SupportedVersions: s.cfg.SupportedVersions,
	}, nil
}

// NotifyRegistrationStatus is kubelet's outcome. A failure ends Run with ErrRegistrationFailed.
func (s *Server) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		klog.ErrorS(nil, "Kubelet could not register the plugin", "driver", s.cfg.DriverName, "error", st.Error)
		s.registered.Store(false)
		s.failedOnce.Do(func() { s.failed <- st.Error })
		return &registerapi.RegistrationStatusResponse{}, nil
	}
	klog.InfoS("Kubelet registered the plugin", "driver", s.cfg.DriverName, "endpoint", s.cfg.Endpoint)
	s.registered.Store(true)
	if s.cfg.ProbeFile != "" {
		if err := touch(s.cfg.ProbeFile); err != nil {
			klog.ErrorS(err, "Cannot create the registration probe file", "path", s.cfg.ProbeFile)
		}
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Listen creates the registration socket, replacing a socket left by an earlier process,
// readable and writable by its owner only (kubelet runs as root). It removes the probe file
// of an earlier process: this one is not registered until kubelet says so.
func (s *Server) Listen() (net.Listener, error) {
	path := s.SocketPath()
	if s.cfg.ProbeFile != "" {
		if err := os.Remove(s.cfg.ProbeFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("old registration probe file: %w", err)
		}
	}
	if err := os.MkdirAll(s.cfg.RegistrationDir, 0o750); err != nil {
		return nil, fmt.Errorf("registration directory: %w", err)
	}
	if err := removeSocket(path); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("registration socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("registration socket: %w", err)
	}
	return l, nil
}

// Run serves kubelet on l (from Listen) until ctx ends (nil) or kubelet reports a failed
// registration (ErrRegistrationFailed), then stops gracefully and removes the socket and
// the probe file, so that kubelet deregisters the plugin.
func (s *Server) Run(ctx context.Context, l net.Listener) error {
	path := s.SocketPath()
	g := grpc.NewServer()
	registerapi.RegisterRegistrationServer(g, s)
	served := make(chan error, 1)
	go func() { served <- g.Serve(l) }()
	klog.InfoS("Waiting for kubelet", "socket", path, "driver", s.cfg.DriverName, "endpoint", s.cfg.Endpoint)

	var err error
	select {
	case <-ctx.Done():
		klog.InfoS("Stopping the registration server")
	case msg := <-s.failed:
		err = fmt.Errorf("%w: %s", ErrRegistrationFailed, msg)
	case serr := <-served:
		err = fmt.Errorf("registration server: %w", serr)
		served <- nil
	}
	// Remove the socket first: kubelet stops calling a plugin whose socket is gone.
	if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
		klog.ErrorS(rerr, "Cannot remove the registration socket", "socket", path)
	}
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		g.Stop()
		<-stopped
	}
	<-served
	if s.cfg.ProbeFile != "" {
		os.Remove(s.cfg.ProbeFile)
	}
	return err
}

// Check asks the registration socket what kubelet would ask and compares the name: the
// health check of node-driver-registrar's /healthz.
func Check(ctx context.Context, socket, driver string) error {
	st, err := os.Stat(socket)
	if err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("registration socket %s is not a socket", socket)
	}
	conn, err := dial(socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return fmt.Errorf("registration socket %s: GetInfo: %w", socket, err)
	}
	if info.Name != driver {
		return fmt.Errorf("registration socket %s serves driver %q, not %q", socket, info.Name, driver)
	}
	return nil
}

// DriverName asks the CSI driver at address (a path or unix:// URL) for its name, retrying
// until it answers or ctx ends; each call is bounded by timeout. The driver container may
// start after this one.
func DriverName(ctx context.Context, address string, timeout time.Duration) (string, error) {
	conn, err := dial(strings.TrimPrefix(address, "unix://"))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	client := csi.NewIdentityClient(conn)
	delay := 100 * time.Millisecond
	var lastErr error
	for attempt := 1; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		resp, err := client.GetPluginInfo(cctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			if resp.GetName() == "" {
				return "", fmt.Errorf("CSI driver at %s reports an empty name", address)
			}
			return resp.GetName(), nil
		}
		lastErr = err
		if attempt == 1 || attempt%10 == 0 {
			klog.InfoS("Waiting for the CSI driver", "address", address, "err", err)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("CSI driver at %s: %w (last error: %v)", address, ctx.Err(), lastErr)
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// ProbeRegistered is the exec probe: nil if probeFile exists, that is, kubelet reported a
// successful registration to the running registrar.
func ProbeRegistered(probeFile string) error {
	if _, err := os.Stat(probeFile); err != nil {
		return fmt.Errorf("kubelet has not registered the plugin yet: %w", err)
	}
	return nil
}

// ProbeFileFor is where node-driver-registrar keeps its probe file: "registration" beside
// the driver's socket path, as this process sees that path.
func ProbeFileFor(endpoint string) string {
	return filepath.Join(filepath.Dir(strings.TrimPrefix(endpoint, "unix://")), "registration")
}

func dial(path string) (*grpc.ClientConn, error) {
	bc := backoff.DefaultConfig
	bc.BaseDelay, bc.MaxDelay = 100*time.Millisecond, time.Second
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc, MinConnectTimeout: time.Second}))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", path, err)
	}
	return conn, nil
}

// removeSocket removes a socket left at path; anything else there is an error.
func removeSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("registration socket: %s exists and is not a socket", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	return nil
}

func touch(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}
