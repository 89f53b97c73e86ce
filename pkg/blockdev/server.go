// Package blockdev presents open chains of pkg/cow as block devices: one FUSE mount per
// node serves every attached chain as a file, and a loop device (direct I/O, 4096-byte
// sectors) is configured on each file. A control socket lets other processes (the image
// tool, attach/detach) act on attached chains through the serving process, which alone
// holds their locks.
package blockdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/cow"
	"github.com/rawcow/csi-rawcow/pkg/fuseuring"
)

// Service is what a node needs of the presentation: the in-process Server and a Client of
// a server in another process both provide it.
type Service interface {
	Attach(name string, opts AttachOptions) (Attachment, error)
	Detach(name string) error
	Snapshot(volume, snap string, labels map[string]string) error
	SnapshotGroup(volumes, snaps []string, labels map[string]string) error
	Clone(src, name string, labels map[string]string) error
	Resize(volume string, size int64) error
	List() ([]Attachment, error)
}

var (
	_ Service = (*Server)(nil)
	_ Service = (*Client)(nil)
)

// Presentations: how a volume reaches its loop device.
const (
	// PresentAuto composes volumes where the store's file system shares blocks, and serves
	// the merged view elsewhere. A base on another file system is copied into the store
	// first (once, shared by every chain over it).
	PresentAuto = "auto"
	// PresentMerged serves the merged view of the chain as a FUSE file (any file system).
	PresentMerged = "merged"
	// PresentComposed composes the chain into its top layer and attaches a plain loop device
	// to that file: native speed, no server in the I/O path (xfs, btrfs).
	PresentComposed = "composed"
)

// AttachOptions say how to attach a chain.
type AttachOptions struct {
	ReadOnly     bool   `json:"readOnly,omitempty"`
	Presentation string `json:"presentation,omitempty"` // PresentAuto when empty
}

// Attachment is a chain served as a block device.
type Attachment struct {
	Name     string `json:"name"`
	Device   string `json:"device"`
	ReadOnly bool   `json:"readOnly"`
	Composed bool   `json:"composed,omitempty"`
	// Stale: a loop device left by an earlier server process. Its FUSE connection is gone,
	// so it fails every I/O; attaching the name again replaces it.
	Stale bool `json:"stale,omitempty"`

	backing  string      // the file the loop device serves
	tag      string      // the loop device's name (loopTag): Device is ours while it has it
	snapshot bool        // a snapshot's chain, read-only whatever was asked
	file     *servedFile // merged view: the FUSE file and its chain
	release  func()      // composed: releases the volume's hold
}

// Server serves chains of one store as block devices.
type Server struct {
	store  *cow.Store
	runDir string
	mnt    string
	fs     *chainFS
	fuse   *fuse.Server
	rings  *fuseuring.Rings // nil: requests come through /dev/fuse
	// ownMount: the server mounted the file system itself (for the rings) and go-fuse
	// serves it through /dev/fd/N; it cannot unmount it.
	ownMount bool

	reflinks bool // the store's file system shares blocks: compose by default

	// localizing serializes copies of bases into the store: a second attach over the same
	// base waits and finds it copied. It is not mu: a copy can take minutes.
	localizing sync.Mutex

	mu       sync.Mutex // serializes attach, detach and the chain-changing operations
	closed   bool       // Close has begun: an attach that decided before it must not go on
	attached map[string]*Attachment
	stale    map[string]*Attachment
}

// ErrServerClosed refuses an attach that comes as, or after, the server closes.
var ErrServerClosed = errors.New("the server is closing")

// Options tune the FUSE mount; the zero value is the measured default.
type Options struct {
	// MaxBackground is the number of requests the kernel keeps in flight to the server.
	MaxBackground int
	// Debug logs every FUSE request.
	Debug bool
	// Transport carries FUSE requests between the kernel and the server; empty is
	// TransportAuto.
	Transport string
}

// FUSE transports.
const (
	// TransportAuto is io_uring where the kernel has it, else /dev/fuse: the default.
	TransportAuto = "auto"
	// TransportIOUring serves requests from io_uring rings, one per CPU, each served by a
	// thread on that CPU (FUSE-over-io-uring, Linux 6.14+): a request costs no syscall of
	// its own and no wake-up of another CPU (docs/PERFORMANCE.md). The server turns the
	// fuse module's enable_uring on; it changes nothing for FUSE servers that do not ask.
	TransportIOUring = "io-uring"
	// TransportDevFuse serves requests read from /dev/fuse by go-fuse's threads: slower small
	// I/O, one copy less for large reads (docs/PERFORMANCE.md).
	TransportDevFuse = "dev-fuse"
)

// MountOptions are the FUSE mount options of the server, tuned for a loop device with direct
// I/O on each file (docs/PERFORMANCE.md). bench/fusefloor mounts with them too.
func MountOptions(opts Options) *fuse.MountOptions {
	if opts.MaxBackground == 0 {
		opts.MaxBackground = 128
	}
	mo := &fuse.MountOptions{
		FsName:            "csi-rawcow",
		Name:              "rawcow",
		MaxWrite:          1 << 20,
		MaxBackground:     opts.MaxBackground,
		DisableXAttrs:     true, // else every write costs a GETXATTR(security.capability) upcall
		ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		DirectMount:       true,
		// Reads answer with data, not file descriptors: a splice attempt would only cost.
		DisableSplice: true,
		Debug:         opts.Debug,
	}
	if opts.Transport == TransportIOUring {
		mo.ExtraCapabilities |= fuse.CAP_OVER_IO_URING
		// READDIRPLUS is one request more for the rings to speak; a directory of a few
		// files gains nothing from it.
		mo.DisableReadDirPlus = true
	}
	return mo
}

// NewServer mounts the FUSE file system under runDir/fuse and starts serving. Loop devices
// left over by an earlier server under the same runDir are found and reported as stale.
func NewServer(store *cow.Store, runDir string, opts Options) (*Server, error) {
	abs, err := filepath.Abs(runDir)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s := &Server{store: store, runDir: abs, mnt: filepath.Join(abs, "fuse"), reflinks: store.Reflinks(),
		attached: map[string]*Attachment{}, stale: map[string]*Attachment{}}
	if err := os.MkdirAll(s.runDir, 0o700); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if c, err := Dial(s.runDir); err == nil {
		c.Close()
		return nil, fmt.Errorf("server: another server is running in %s", s.runDir)
	}
	if err := s.findStale(); err != nil {
		return nil, err
	}
	// A mount left by a dead server must go before we mount again. It answers ENOTCONN, or,
	// while the kernel is still tearing down the dead server's rings (asynchronously, after
	// the process is gone), other errors: any failure to stat it but ENOENT means a mount.
	if _, err := os.Stat(s.mnt); (err != nil && !errors.Is(err, fs.ErrNotExist)) || isMountPoint(s.mnt) {
		if uerr := unix.Unmount(s.mnt, unix.MNT_DETACH); uerr != nil {
			return nil, fmt.Errorf("server: unmount stale %s (stat: %v): %w", s.mnt, err, uerr)
		}
	}
	if err := os.MkdirAll(s.mnt, 0o700); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s.fs = newChainFS()
	switch opts.Transport {
	case TransportAuto, "":
		opts.Transport = TransportIOUring
		if err := s.mount(opts); err != nil {
			klog.InfoS("Serving through /dev/fuse", "reason", err)
			opts.Transport = TransportDevFuse
			err = s.mount(opts)
		}
	case TransportIOUring, TransportDevFuse:
		err = s.mount(opts)
	default:
		err = fmt.Errorf("unknown FUSE transport %q", opts.Transport)
	}
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	klog.InfoS("Serving chains", "store", store.Dir(), "mount", s.mnt, "stale", len(s.stale), "transport", s.Transport())
	return s, nil
}

// mount mounts the FUSE file system and starts serving it over opts.Transport; on failure
// nothing stays mounted.
func (s *Server) mount(opts Options) error {
	mo := MountOptions(opts)
	mountPoint, devFd := s.mnt, -1
	s.ownMount, s.rings = false, nil
	if opts.Transport == TransportIOUring {
		if err := fuseuring.Enable(); err != nil {
			return err
		}
		fd, err := mountForRings(s.mnt, mo)
		if err != nil {
			return err
		}
		mountPoint, devFd, s.ownMount = fmt.Sprintf("/dev/fd/%d", fd), fd, true
		// Else go-fuse would mount again, on what /dev/fd/N resolves to: /dev/fuse.
		mo.DirectMount = false
	}
	var err error
	if s.fuse, err = fuse.NewServer(s.fs, mountPoint, mo); err != nil {
		if devFd >= 0 {
			unix.Unmount(s.mnt, unix.MNT_DETACH)
			unix.Close(devFd)
		}
		return fmt.Errorf("mount %s: %w", s.mnt, err)
	}
	go s.fuse.Serve()
	if err := s.fuse.WaitMount(); err != nil {
		s.unmount()
		return fmt.Errorf("mount %s: %w", s.mnt, err)
	}
	if devFd < 0 {
		return nil
	}
	if err := s.startRings(devFd, mo.MaxWrite); err != nil {
		// The connection asked for rings: without them it would hold every request.
		s.unmount()
		return err
	}
	if err := probePoll(s.mnt); err != nil {
		s.unmount()
		return err
	}
	return nil
}

// probePoll makes the kernel send its one FUSE_POLL, which the rings answer ENOSYS (see
// pollProbeName). Raw system calls: this thread gives up its P while it waits, so the runtime
// may stop the world meanwhile.
func probePoll(mnt string) error {
	fd, err := unix.Open(filepath.Join(mnt, pollProbeName), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("poll probe: %w", err)
	}
	defer unix.Close(fd)
	if _, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0); err != nil {
		return fmt.Errorf("poll probe: %w", err)
	}
	return nil
}

// startRings registers the rings once the connection is initialized: the kernel refuses
// them before FUSE_INIT's reply (EAGAIN), and holds every request but FUSE_INIT until they
// are all registered.
func (s *Server) startRings(devFd, payloadSize int) error {
	var err error
	for try := 0; try < 500; try++ {
		if s.fuse.KernelSettings().Major != 0 {
			s.rings, err = fuseuring.Start(devFd, s.fs.serveRing, fuseuring.Options{Depth: ringDepth, PayloadSize: payloadSize})
			if !errors.Is(err, syscall.EAGAIN) {
				return err
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("FUSE_INIT did not complete: %v", err)
}

// Transport says how the server gets its FUSE requests: TransportIOUring or TransportDevFuse.
func (s *Server) Transport() string {
	if s.rings != nil {
		return TransportIOUring
	}
	return TransportDevFuse
}

// ringDepth is the number of requests each CPU's ring holds at once. A loop device issues
// from few CPUs: with 8, 4 KiB random writes at queue depth 32 lost a fifth (docs/PERFORMANCE.md).
const ringDepth = 32

// unmount ends the FUSE connection, which also ends the rings' entries, and waits for the
// serving loops.
func (s *Server) unmount() error {
	if !s.ownMount {
		return s.fuse.Unmount()
	}
	// go-fuse cannot unmount what it did not mount; the retries are its own: the kernel may
	// still count the last loop device's close.
	var err error
	for try, delay := 0, 5*time.Millisecond; try < 5; try, delay = try+1, 2*delay {
		if err = unix.Unmount(s.mnt, 0); err == nil {
			break
		}
		time.Sleep(delay)
	}
	if err != nil {
		return err
	}
	s.fuse.Wait()
	if s.rings != nil {
		s.rings.Close()
	}
	return nil
}

// findStale finds the loop devices that earlier servers of this runDir left, by their tags.
// A composed volume's device needs no server and went on working: it is taken back. The
// others served a FUSE file that died with its server: they are stale, failing every I/O
// until they are detached or their name is attached again.
func (s *Server) findStale() error {
	loops, err := loopsOf(s.runDir)
	if err != nil {
		return fmt.Errorf("server: list loop devices: %w", err)
	}
	if len(loops) == 0 {
		return nil
	}
	names, err := s.storeNames()
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	for _, l := range loops {
		name, ok := names[l.tag]
		if !ok {
			// Its volume or snapshot is gone from the store: nothing can use the device.
			klog.InfoS("Detaching a loop device of an earlier server whose volume is gone", "device", l.Device, "file", l.Backing)
			if err := detachTagged(l.Device, l.tag); err != nil {
				klog.ErrorS(err, "Cannot detach", "device", l.Device)
			}
			continue
		}
		if release, ok := s.takeBackComposed(name, l); ok {
			s.attached[name] = &Attachment{Name: name, Device: l.Device, ReadOnly: l.ReadOnly, Composed: true,
				backing: l.Backing, tag: l.tag, release: release}
			klog.InfoS("Took back a composed volume", "name", name, "device", l.Device)
			continue
		}
		s.stale[name] = &Attachment{Name: name, Device: l.Device, ReadOnly: l.ReadOnly, Stale: true, tag: l.tag}
		klog.InfoS("Found loop device of an earlier server", "name", name, "device", l.Device)
	}
	return nil
}

// storeNames maps the tag of every volume and snapshot in the store to its name.
func (s *Server) storeNames() (map[string]string, error) {
	vols, err := s.store.Volumes()
	if err != nil {
		return nil, err
	}
	snaps, err := s.store.Snapshots()
	if err != nil {
		return nil, err
	}
	names := map[string]string{}
	for _, n := range append(vols, snaps...) {
		names[loopTag(s.runDir, n)] = n
	}
	return names, nil
}

// takeBackComposed holds volume name for l when l serves the volume's composed top file (the
// same inode), and reports whether it did.
func (s *Server) takeBackComposed(name string, l taggedLoop) (release func(), ok bool) {
	path, opaque, err := s.store.TopPath(name)
	if err != nil || !opaque {
		return nil, false
	}
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil || st.Ino != l.inode || uint64(st.Dev) != l.dev {
		return nil, false
	}
	release, err = s.store.Hold(name)
	if err != nil {
		klog.ErrorS(err, "Cannot take back a composed volume; its device is reported stale", "name", name, "device", l.Device)
		return nil, false
	}
	return release, true
}

func isMountPoint(dir string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(dir, &st) != nil || unix.Stat(filepath.Dir(dir), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}

// Store returns the store the server serves.
func (s *Server) Store() *cow.Store { return s.store }

// MountDir returns the directory where attached chains appear as files.
func (s *Server) MountDir() string { return s.mnt }

// Attach serves a volume (read-write unless readOnly) or a snapshot (always read-only) as a
// loop device and returns its path. Attaching an attached name again in the same mode
// returns the same device.
func (s *Server) Attach(name string, opts AttachOptions) (Attachment, error) {
	if err := cow.ValidateName(name); err != nil {
		return Attachment{}, err
	}
	// Deciding may copy a base into the store, for minutes: it is done before the server's
	// lock is taken, so that other volumes attach and detach meanwhile.
	var composed *bool
	if !s.isAttached(name) { // else attach returns the attachment as it is
		c, err := s.composes(name, opts.Presentation)
		if err != nil {
			return Attachment{}, err
		}
		composed = &c
	}
	a, err := s.attach(name, opts, composed)
	if err != nil {
		return Attachment{}, err
	}
	return *a, nil
}

func (s *Server) isAttached(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.attached[name] != nil
}

// attach attaches name as composes decided, or, when composed is nil (it was attached when
// Attach looked), returns the attachment.
func (s *Server) attach(name string, opts AttachOptions, composed *bool) (*Attachment, error) {
	readOnly := opts.ReadOnly
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("attach %s: %w", name, ErrServerClosed)
	}
	if a := s.attached[name]; a != nil && !hasTag(a.Device, a.tag) {
		// Its device is gone: a detach that found it busy was finished by the kernel at
		// its last close, and the number may serve another attachment by now.
		if err := s.forget(a); err != nil {
			return nil, err
		}
	}
	if a := s.attached[name]; a != nil {
		// A snapshot is attached read-only whatever was asked, the first time too.
		if a.ReadOnly != readOnly && !a.snapshot {
			return nil, fmt.Errorf("attach %s: %w: attached with readOnly=%v", name, cow.ErrBusy, a.ReadOnly)
		}
		return a, nil
	}
	if old := s.stale[name]; old != nil {
		if err := detachTagged(old.Device, old.tag); err != nil {
			return nil, fmt.Errorf("attach %s: detach stale %s: %w", name, old.Device, err)
		}
		delete(s.stale, name)
	}
	if composed == nil { // detached since Attach looked: decide now, under the lock
		c, err := s.composes(name, opts.Presentation)
		if err != nil {
			return nil, err
		}
		composed = &c
	}
	var a *Attachment
	var err error
	if *composed {
		a, err = s.attachComposed(name, readOnly)
	} else {
		a, err = s.attachMerged(name, readOnly)
	}
	if err != nil {
		return nil, err
	}
	s.attached[name] = a
	klog.InfoS("Attached", "name", name, "device", a.Device, "readOnly", a.ReadOnly, "composed", a.Composed)
	return a, nil
}

// composes decides the presentation of name: snapshots are always served merged (their
// layers are frozen); volumes are composed where asked, or by default where the file
// system shares blocks. There, a base on another file system is copied into the store first
// (localizeBase), so that the volume shares its blocks; nothing is served slowly in silence.
func (s *Server) composes(name, presentation string) (bool, error) {
	info, err := s.store.Info(name)
	if err != nil {
		return false, fmt.Errorf("attach %s: %w", name, err)
	}
	switch presentation {
	case PresentComposed:
		if info.Kind != "volume" {
			return false, fmt.Errorf("attach %s: %w: only a volume can be composed", name, cow.ErrNotSupported)
		}
		// Without reflinks composing copies the chain's data, the base's too, wherever it is.
		if s.reflinks {
			if err := s.localizeBase(info); err != nil {
				return false, fmt.Errorf("attach %s: %w", name, err)
			}
		}
		return true, nil
	case PresentMerged:
		return false, nil
	case PresentAuto, "":
		if info.Kind != "volume" || !s.reflinks {
			return false, nil
		}
		if err := s.localizeBase(info); err != nil {
			klog.ErrorS(err, "Serving the merged view instead of composing: the volume's base could not be copied into the store", "name", name)
			return false, nil
		}
		return true, nil
	}
	return false, fmt.Errorf("attach %s: %w: presentation %q (auto, merged, composed)", name, cow.ErrNotSupported, presentation)
}

// localizeBase copies the volume's base into the store when it lies on another file system
// (cow.Store.LocalizeBase): composing over it there would copy its data into the volume
// instead of sharing its blocks. A base that an opaque layer hides is not read: it stays.
func (s *Server) localizeBase(info *cow.Info) error {
	if len(info.Layers) == 0 || info.Layers[0].State != cow.Base || info.Layers[0].Origin != "" {
		return nil
	}
	for _, l := range info.Layers[1:] {
		if l.Opaque {
			return nil
		}
	}
	base := info.Layers[0].Path
	s.localizing.Lock()
	defer s.localizing.Unlock()
	start := time.Now()
	logged := int64(-1) // the last tenth logged
	res, err := s.store.LocalizeBase(info.Name, func(done, total int64) {
		if total <= 0 {
			return
		}
		if tenth := done * 10 / total; tenth > logged {
			logged = tenth
			klog.InfoS("Copying a base on another file system into the store, once for every volume over it",
				"name", info.Name, "base", base, "percent", tenth*10, "copied", done, "total", total, "elapsed", time.Since(start).Round(time.Millisecond))
		}
	})
	if err != nil {
		return fmt.Errorf("copy base %s into the store: %w", base, err)
	}
	if res.Copied {
		klog.InfoS("Copied a base into the store; volumes over it share the copy's blocks", "name", info.Name,
			"base", base, "copy", res.Path, "size", res.Size, "allocated", res.Allocated, "duration", time.Since(start).Round(time.Millisecond))
	}
	return nil
}

func (s *Server) attachMerged(name string, readOnly bool) (*Attachment, error) {
	chain, snapshot, err := s.openChain(name, readOnly)
	if err != nil {
		return nil, err
	}
	f := s.fs.add(name, chain)
	backing, tag := filepath.Join(s.mnt, name), loopTag(s.runDir, name)
	dev, err := AttachLoop(backing, chain.ReadOnly(), tag)
	if err != nil {
		s.fs.remove(f)
		chain.Close()
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	return &Attachment{Name: name, Device: dev, ReadOnly: chain.ReadOnly(), backing: backing, tag: tag, snapshot: snapshot, file: f}, nil
}

// attachComposed holds the volume, composes its chain into its top layer and attaches a
// plain loop device to that file.
func (s *Server) attachComposed(name string, readOnly bool) (*Attachment, error) {
	release, err := s.store.Hold(name)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	err = s.store.Compose(name)
	var path string
	if err == nil {
		path, _, err = s.store.TopPath(name)
	}
	var dev string
	tag := loopTag(s.runDir, name)
	if err == nil {
		dev, err = AttachLoop(path, readOnly, tag)
	}
	if err != nil {
		release()
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	return &Attachment{Name: name, Device: dev, ReadOnly: readOnly, Composed: true, backing: path, tag: tag, release: release}, nil
}

// openChain opens name, a snapshot (read-only) or a volume.
func (s *Server) openChain(name string, readOnly bool) (c *cow.Chain, snapshot bool, err error) {
	c, err = s.store.OpenSnapshot(name)
	snapshot = err == nil
	if errors.Is(err, cow.ErrNotFound) {
		c, err = s.store.Open(name, cow.OpenOptions{ReadOnly: readOnly})
	}
	if err != nil {
		return nil, false, fmt.Errorf("attach %s: %w", name, err)
	}
	return c, snapshot, nil
}

// detachWait is how long Detach waits for the kernel to let go of the file after
// LOOP_CLR_FD; a device still open (mounted) is detached when its last user closes it.
const detachWait = 5 * time.Second

// Detach releases a name's loop device and closes its chain. It fails with cow.ErrBusy while
// the device is still open; the kernel then detaches it at the last close, and a later
// Detach completes.
func (s *Server) Detach(name string) error {
	if err := cow.ValidateName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if old := s.stale[name]; old != nil {
		if err := detachTagged(old.Device, old.tag); err != nil {
			return err
		}
		delete(s.stale, name)
		if s.attached[name] == nil {
			return nil
		}
	}
	a := s.attached[name]
	if a == nil {
		return nil // idempotent
	}
	return s.detachLocked(a)
}

func (s *Server) detachLocked(a *Attachment) error {
	if err := detachTagged(a.Device, a.tag); err != nil {
		return err
	}
	deadline := time.Now().Add(detachWait)
	for hasTag(a.Device, a.tag) {
		if time.Now().After(deadline) {
			return fmt.Errorf("detach %s: %w: %s is still open; it detaches at its last close", a.Name, cow.ErrBusy, a.Device)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s.forget(a)
}

// forget drops an attachment whose device is detached and releases what served it.
func (s *Server) forget(a *Attachment) error {
	delete(s.attached, a.Name)
	if a.file != nil {
		s.fs.remove(a.file)
	}
	if err := a.close(); err != nil {
		return fmt.Errorf("detach %s: %w", a.Name, err)
	}
	klog.InfoS("Detached", "name", a.Name, "device", a.Device)
	return nil
}

// close releases what serves a detached attachment: its FUSE file and chain, or its hold.
func (a *Attachment) close() error {
	if a.release != nil {
		a.release()
		return nil
	}
	return a.file.chain.Close()
}

// flushDevice makes what was written to a composed volume's device durable in its file
// before the file is cloned.
func flushDevice(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("flush %s: %w", dev, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flush %s: %w", dev, err)
	}
	return nil
}

// List returns the attached names, stale ones included, sorted by name. Attachments whose
// devices are gone (a busy detach that the kernel finished at the last close, a stale
// device detached by hand) are dropped first: their numbers may serve others by now.
func (s *Server) List() ([]Attachment, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range s.attached {
		if !hasTag(a.Device, a.tag) {
			if err := s.forget(a); err != nil {
				klog.ErrorS(err, "Releasing an attachment whose device is gone", "name", a.Name, "device", a.Device)
			}
		}
	}
	for name, a := range s.stale {
		if !hasTag(a.Device, a.tag) {
			delete(s.stale, name)
		}
	}
	var out []Attachment
	for _, a := range s.attached {
		out = append(out, *a)
	}
	for _, a := range s.stale {
		if s.attached[a.Name] == nil {
			out = append(out, *a)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Snapshot takes a snapshot of a volume, live if it is attached: its in-flight I/O is
// quiesced, the top flushed and frozen, and the device goes on with a new top.
//
// A composed volume's device is flushed and its top file cloned (FICLONE) into the
// snapshot: completed writes are in the file, and the clone is atomic.
func (s *Server) Snapshot(volume, snap string, labels map[string]string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.flushComposed(volume); err != nil {
		return err
	}
	return s.store.Snapshot(volume, snap, labels) // routed to the open or held chain by the store
}

// SnapshotGroup takes snapshots of several volumes at one point in time, attached or not
// (cow.Store.SnapshotGroup): the merged ones are quiesced together; a composed one (at most
// one per group) is flushed first and cloned while they stand still.
func (s *Server) SnapshotGroup(volumes, snaps []string, labels map[string]string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range volumes {
		if err := s.flushComposed(v); err != nil {
			return err
		}
	}
	return s.store.SnapshotGroup(volumes, snaps, labels)
}

func (s *Server) flushComposed(volume string) error {
	if a := s.attached[volume]; a != nil && a.Composed {
		return flushDevice(a.Device)
	}
	return nil
}

// Clone makes a new volume over a snapshot or a volume, attached or not.
func (s *Server) Clone(src, name string, labels map[string]string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.flushComposed(src); err != nil {
		return err
	}
	return s.store.Clone(src, name, labels)
}

// Resize grows a volume; an attached one's loop device takes up the new size at once.
func (s *Server) Resize(volume string, size int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.store.Resize(volume, size); err != nil {
		return err
	}
	a := s.attached[volume]
	if a == nil {
		return nil
	}
	if a.file != nil {
		s.fs.invalidate(a.file)
		// The loop driver reads the size the kernel has cached for the file: refresh it first.
		if _, err := os.Stat(a.backing); err != nil {
			return fmt.Errorf("resize %s: %w", volume, err)
		}
	}
	return RefreshCapacity(a.Device)
}

// Close detaches every merged-view device it can, flushes and closes every chain and
// unmounts; those devices still open (mounted) fail I/O from then on, as they would after a
// crash. Composed devices need no server: they stay attached, and the next server of this
// run directory takes them back.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var errs []error
	for _, a := range s.attached {
		if a.Composed {
			a.close()
			continue
		}
		if err := s.detachLocked(a); err != nil {
			errs = append(errs, err, a.close())
		}
	}
	s.mu.Unlock()
	if err := s.unmount(); err != nil {
		errs = append(errs, fmt.Errorf("unmount %s: %w", s.mnt, err))
		unix.Unmount(s.mnt, unix.MNT_DETACH)
	}
	return errors.Join(errs...)
}
