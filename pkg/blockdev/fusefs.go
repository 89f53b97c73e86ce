package blockdev

import (
	"errors"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// attrTimeout is how long the kernel may cache a file's attributes. Non-zero, or every write
// costs a GETATTR upcall (measured, research/fs-and-fuse-probe.md); a resize invalidates the
// cache explicitly.
const attrTimeout = time.Hour

// pollProbeName names a file that exists only to be opened once, right after mount. Go
// registers every file it opens with its poller (epoll_ctl), which a FUSE file turns into a
// FUSE_POLL request; when the server's own process does that while the runtime stops the
// world, the request waits for a serving thread that waits for the world, forever. Answering
// one FUSE_POLL with ENOSYS makes the kernel never send another on this connection. go-fuse
// does it for the mounts it makes, under this name, which it answers itself over /dev/fuse;
// over the rings chainFS answers it. Volume names never start with a dot.
const pollProbeName = ".go-fuse-epoll-hack"

// pollProbeNode is the probe file's node id; chainFS counts its own up from 2.
const pollProbeNode = ^uint64(0)

// servedFile is one chain served as a regular file in the mount's root directory.
type servedFile struct {
	name  string
	node  uint64
	chain *cow.Chain
}

// chainFS is a flat FUSE file system: the root directory holds one file per served chain.
// It speaks the raw go-fuse protocol API: with a fixed, tiny namespace there is nothing for
// an inode tree to do, and the I/O path stays one map lookup away from the engine.
type chainFS struct {
	fuse.RawFileSystem // ENOSYS for everything not implemented here

	// files is replaced, never mutated, on attach and detach: the I/O path reads it without a lock.
	files    atomic.Pointer[map[uint64]*servedFile]
	mu       sync.Mutex // serializes add and remove
	nextNode uint64
	server   *fuse.Server
}

var _ fuse.RawFileSystem = (*chainFS)(nil)

func newChainFS() *chainFS {
	fs := &chainFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), nextNode: fuse.FUSE_ROOT_ID + 1}
	fs.files.Store(&map[uint64]*servedFile{})
	return fs
}

func (fs *chainFS) String() string { return "csi-rawcow" }

func (fs *chainFS) Init(s *fuse.Server) { fs.server = s }

// add serves chain under name; node ids are never reused, so a stale kernel reference to a
// detached file can never reach another chain.
func (fs *chainFS) add(name string, chain *cow.Chain) *servedFile {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f := &servedFile{name: name, node: fs.nextNode, chain: chain}
	fs.nextNode++
	old := *fs.files.Load()
	next := make(map[uint64]*servedFile, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[f.node] = f
	fs.files.Store(&next)
	return f
}

func (fs *chainFS) remove(f *servedFile) {
	fs.mu.Lock()
	old := *fs.files.Load()
	next := make(map[uint64]*servedFile, len(old))
	for k, v := range old {
		if k != f.node {
			next[k] = v
		}
	}
	fs.files.Store(&next)
	fs.mu.Unlock()
	if fs.server != nil {
		fs.server.DeleteNotify(fuse.FUSE_ROOT_ID, f.node, f.name)
	}
}

func (fs *chainFS) file(node uint64) *servedFile { return (*fs.files.Load())[node] }

func (fs *chainFS) byName(name string) *servedFile {
	for _, f := range *fs.files.Load() {
		if f.name == name {
			return f
		}
	}
	return nil
}

// invalidate drops the kernel's cached attributes of f (after a resize).
func (fs *chainFS) invalidate(f *servedFile) {
	if fs.server != nil {
		fs.server.InodeNotify(f.node, -1, 0)
	}
}

func (fs *chainFS) fillAttr(node uint64, a *fuse.Attr) bool {
	now := uint64(time.Now().Unix())
	a.Ino, a.Atime, a.Mtime, a.Ctime = node, now, now, now
	a.Blksize = cow.BlockSize
	if node == fuse.FUSE_ROOT_ID {
		a.Mode, a.Nlink = syscall.S_IFDIR|0o755, 2
		return true
	}
	if node == pollProbeNode {
		a.Mode, a.Nlink = syscall.S_IFREG|0o400, 1
		return true
	}
	f := fs.file(node)
	if f == nil {
		return false
	}
	a.Mode, a.Nlink = syscall.S_IFREG|0o600, 1
	if f.chain.ReadOnly() {
		a.Mode = syscall.S_IFREG | 0o400
	}
	a.Size = uint64(f.chain.Size())
	a.Blocks = a.Size / 512
	return true
}

func (fs *chainFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	if name == pollProbeName {
		out.NodeId = pollProbeNode
		fs.fillAttr(pollProbeNode, &out.Attr)
		return fuse.OK
	}
	f := fs.byName(name)
	if f == nil {
		return fuse.ENOENT
	}
	out.NodeId = f.node
	out.SetEntryTimeout(attrTimeout)
	out.SetAttrTimeout(attrTimeout)
	fs.fillAttr(f.node, &out.Attr)
	return fuse.OK
}

func (fs *chainFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if !fs.fillAttr(in.NodeId, &out.Attr) {
		return fuse.ENOENT
	}
	out.SetTimeout(attrTimeout)
	return fuse.OK
}

// SetAttr accepts what tools do to files they write (times, a truncate to the same size)
// and refuses a size change: a volume grows through Resize, never behind the engine's back.
func (fs *chainFS) SetAttr(_ <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	f := fs.file(in.NodeId)
	if f == nil {
		return fuse.ENOENT
	}
	if sz, ok := in.GetSize(); ok && int64(sz) != f.chain.Size() {
		return fuse.Status(syscall.EPERM)
	}
	fs.fillAttr(in.NodeId, &out.Attr)
	out.SetTimeout(attrTimeout)
	return fuse.OK
}

func (fs *chainFS) Access(_ <-chan struct{}, _ *fuse.AccessIn) fuse.Status { return fuse.OK }

func (fs *chainFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId == pollProbeNode {
		return fuse.OK
	}
	f := fs.file(in.NodeId)
	if f == nil {
		return fuse.ENOENT
	}
	if f.chain.ReadOnly() && in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return fuse.EROFS
	}
	// No page cache in the FUSE layer: the loop device runs with direct I/O and the layers
	// are cached once, by the host file system under them.
	out.OpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	return fuse.OK
}

func (fs *chainFS) Read(_ <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	f := fs.file(in.NodeId)
	if f == nil {
		return nil, fuse.EBADF
	}
	r := viewResults.Get().(*viewResult)
	view, err := f.chain.ReadView(buf[:in.Size], int64(in.Offset), r.pieces[:0])
	if err != nil {
		r.release()
		klog.ErrorS(err, "Read failed", "name", f.name, "offset", in.Offset, "size", in.Size)
		return nil, errnoOf(err)
	}
	r.pieces, r.chain, r.size = view, f.chain, 0
	for _, p := range view {
		r.size += len(p)
	}
	if r.size == 0 { // go-fuse calls Done only for a reply with data
		r.Done()
		return fuse.ReadResultData(nil), fuse.OK
	}
	return r, fuse.OK
}

// viewResult is a read's reply as the engine's view of it: pieces of mapped layers in place,
// written to the kernel in one writev (go-fuse's vectored reply, for a result with Slices), so
// that data from frozen layers and bases is copied once, by the kernel, into the reader's pages.
// The chain stays read-locked until go-fuse calls Done after the write.
type viewResult struct {
	pieces [][]byte
	chain  *cow.Chain
	size   int
}

var viewResults = sync.Pool{New: func() any { return &viewResult{pieces: make([][]byte, 0, 16)} }}

func (r *viewResult) Slices() ([][]byte, fuse.Status) { return r.pieces, fuse.OK }

func (r *viewResult) Size() int { return r.size }

// Bytes flattens the view, for a go-fuse path that cannot write vectors.
func (r *viewResult) Bytes(buf []byte) ([]byte, fuse.Status) {
	if cap(buf) < r.size {
		buf = make([]byte, r.size)
	}
	buf = buf[:0]
	for _, p := range r.pieces {
		buf = append(buf, p...)
	}
	return buf, fuse.OK
}

func (r *viewResult) Done() {
	r.chain.EndView()
	r.release()
}

// release returns r to the pool without references to mappings or request buffers, also
// those a failed ReadView appended before it failed.
func (r *viewResult) release() {
	clear(r.pieces[:cap(r.pieces)])
	r.pieces, r.chain = r.pieces[:0], nil
	viewResults.Put(r)
}

func (fs *chainFS) Write(_ <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	f := fs.file(in.NodeId)
	if f == nil {
		return 0, fuse.EBADF
	}
	n, err := f.chain.WriteAt(data, int64(in.Offset))
	if err != nil {
		klog.ErrorS(err, "Write failed", "name", f.name, "offset", in.Offset, "size", len(data))
		return uint32(n), errnoOf(err)
	}
	return uint32(n), fuse.OK
}

// falloc modes the loop driver sends: discard (punch hole) and write-zeroes (zero range, or
// write-zeroes on kernels that have it). Plain allocation is accepted and does nothing: the
// engine never preallocates a layer (DESIGN §2).
const fallocWriteZeroes = 0x80 // FALLOC_FL_WRITE_ZEROES, Linux 6.17

func (fs *chainFS) Fallocate(_ <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	f := fs.file(in.NodeId)
	if f == nil {
		return fuse.EBADF
	}
	off, n := int64(in.Offset), int64(in.Length)
	var err error
	switch mode := in.Mode &^ unix.FALLOC_FL_KEEP_SIZE; {
	case mode == unix.FALLOC_FL_PUNCH_HOLE:
		err = f.chain.Discard(off, n)
	case mode == unix.FALLOC_FL_ZERO_RANGE, mode == fallocWriteZeroes:
		err = f.chain.WriteZeroes(off, n)
	case mode == 0:
		if off+n > f.chain.Size() {
			return fuse.Status(syscall.EFBIG)
		}
	default:
		return fuse.Status(syscall.EOPNOTSUPP)
	}
	return errnoOf(err)
}

func (fs *chainFS) Fsync(_ <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	f := fs.file(in.NodeId)
	if f == nil {
		return fuse.EBADF
	}
	return errnoOf(f.chain.Flush())
}

// Flush is sent at every close(2); durability is fsync's business.
func (fs *chainFS) Flush(_ <-chan struct{}, _ *fuse.FlushIn) fuse.Status { return fuse.OK }

func (fs *chainFS) Release(_ <-chan struct{}, _ *fuse.ReleaseIn) {}

func (fs *chainFS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, _ *fuse.OpenOut) fuse.Status {
	if in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	return fuse.OK
}

func (fs *chainFS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	files := *fs.files.Load()
	nodes := make([]uint64, 0, len(files))
	for n := range files {
		nodes = append(nodes, n)
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i] < nodes[j] })
	for i := int(in.Offset); i < len(nodes); i++ {
		f := files[nodes[i]]
		if !out.AddDirEntry(fuse.DirEntry{Name: f.name, Ino: f.node, Mode: syscall.S_IFREG, Off: uint64(i + 1)}) {
			break
		}
	}
	return fuse.OK
}

func (fs *chainFS) ReleaseDir(_ *fuse.ReleaseIn) {}

func (fs *chainFS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize, out.Frsize, out.NameLen = cow.BlockSize, cow.BlockSize, 255
	return fuse.OK
}

// errnoOf maps an engine error to the errno the kernel passes on.
func errnoOf(err error) fuse.Status {
	switch {
	case err == nil:
		return fuse.OK
	case errors.Is(err, cow.ErrReadOnly):
		return fuse.EROFS
	case errors.Is(err, cow.ErrOutOfRange):
		return fuse.Status(syscall.EFBIG)
	case errors.Is(err, syscall.ENOSPC):
		return fuse.Status(syscall.ENOSPC)
	case errors.Is(err, syscall.EDQUOT):
		return fuse.Status(syscall.EDQUOT)
	}
	return fuse.EIO
}
