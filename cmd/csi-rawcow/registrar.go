package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/registrar"
)

// registrarMain registers the node plugin with kubelet, in place of the node-driver-registrar
// sidecar and with its flags: it asks the driver at --csi-address for its name, then serves
// kubelet's plugin-registration API on --plugin-registration-path/NAME-reg.sock, pointing
// kubelet at --kubelet-registration-path, until SIGINT or SIGTERM (the socket is removed, so
// kubelet deregisters the driver) or until kubelet reports a failed registration (exit 1: the
// container restarts and kubelet tries again).
func registrarMain(args []string) int {
	fs := flag.NewFlagSet("registrar", flag.ContinueOnError)
	csiAddress := fs.String("csi-address", "/run/csi/socket", "path of the CSI driver socket this process connects to")
	kubeletPath := fs.String("kubelet-registration-path", "", "path of the CSI driver socket on the host, as kubelet reaches it (required)")
	regPath := fs.String("plugin-registration-path", "/registration", "kubelet's plugin registration directory (host /var/lib/kubelet/plugins_registry)")
	healthPort := fs.Int("health-port", 0, "TCP port of the /healthz server, 0 for none (deprecated in node-driver-registrar; prefer --http-endpoint)")
	httpEndpoint := fs.String("http-endpoint", "", "address of the HTTP server for /healthz (and pprof), e.g. :9809; empty for none")
	timeout := fs.Duration("timeout", time.Second, "timeout of each call to the CSI driver")
	mode := fs.String("mode", "registration", `"registration" (serve kubelet) or "kubelet-registration-probe" (exit 0 if kubelet registered the running registrar: an exec liveness probe)`)
	pprofOn := fs.Bool("enable-pprof", false, "serve pprof on the HTTP endpoint")
	_ = fs.Duration("connection-timeout", 0, "ignored (deprecated in node-driver-registrar)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	klog.InitFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "csi-rawcow registrar: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if *showVersion {
		fmt.Println("csi-rawcow registrar", version)
		return 0
	}
	if *kubeletPath == "" {
		klog.ErrorS(nil, "--kubelet-registration-path is required")
		return 2
	}
	probeFile := registrar.ProbeFileFor(*kubeletPath)
	switch *mode {
	case "kubelet-registration-probe":
		if err := registrar.ProbeRegistered(probeFile); err != nil {
			klog.ErrorS(err, "Not registered", "probeFile", probeFile)
			return 1
		}
		return 0
	case "registration":
	default:
		klog.ErrorS(nil, "Unknown --mode", "mode", *mode)
		return 2
	}
	if *healthPort > 0 && *httpEndpoint != "" {
		klog.ErrorS(nil, "Only one of --health-port and --http-endpoint can be set")
		return 2
	}
	addr := *httpEndpoint
	if *healthPort > 0 {
		addr = ":" + strconv.Itoa(*healthPort)
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	klog.InfoS("Starting the registrar", "version", version, "csiAddress", *csiAddress, "kubeletRegistrationPath", *kubeletPath)
	name, err := registrar.DriverName(ctx, *csiAddress, *timeout)
	if err != nil {
		if ctx.Err() != nil {
			klog.InfoS("Stopped before the CSI driver answered")
			return 0
		}
		klog.ErrorS(err, "Cannot get the CSI driver's name")
		return 1
	}
	srv, err := registrar.New(registrar.Config{
		DriverName: name, Endpoint: *kubeletPath, RegistrationDir: *regPath, ProbeFile: probeFile,
	})
	if err != nil {
		klog.ErrorS(err, "Bad configuration")
		return 2
	}
	l, err := srv.Listen()
	if err != nil {
		klog.ErrorS(err, "Cannot open the registration socket")
		return 1
	}
	if addr != "" {
		hl, err := net.Listen("tcp", addr)
		if err != nil {
			l.Close()
			klog.ErrorS(err, "Cannot open the HTTP endpoint", "address", addr)
			return 1
		}
		hs := &http.Server{Handler: healthMux(srv.SocketPath(), name, *timeout, *pprofOn), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hs.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "HTTP server failed")
				cancel()
			}
		}()
		defer hs.Close()
		klog.InfoS("Serving /healthz", "address", hl.Addr().String())
	}
	if err := srv.Run(ctx, l); err != nil {
		klog.ErrorS(err, "Registrar stopped")
		klog.Flush()
		return 1
	}
	klog.InfoS("Registrar stopped, registration socket removed")
	klog.Flush()
	return 0
}

// healthMux serves /healthz: 200 if the registration socket answers GetInfo with our name.
func healthMux(socket, name string, timeout time.Duration, withPprof bool) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		if err := registrar.Check(ctx, socket, name); err != nil {
			klog.ErrorS(err, "Health check failed")
			code := http.StatusInternalServerError
			if errors.Is(err, os.ErrNotExist) {
				code = http.StatusNotFound
			}
			http.Error(w, err.Error(), code)
			return
		}
		w.Write([]byte("ok"))
	})
	if withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}
