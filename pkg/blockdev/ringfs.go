package blockdev

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/rawcow/csi-rawcow/pkg/fuseuring"
)

// FUSE opcodes served from the rings (include/uapi/linux/fuse.h; go-fuse keeps its own
// unexported). Anything else is answered ENOSYS, as go-fuse answers what chainFS leaves out;
// for FUSE_POLL that answer matters (see pollProbeName).
const (
	opLookup     = 1
	opGetAttr    = 3
	opSetAttr    = 4
	opOpen       = 14
	opRead       = 15
	opWrite      = 16
	opStatFs     = 17
	opRelease    = 18
	opFsync      = 20
	opFlush      = 25
	opOpenDir    = 27
	opReadDir    = 28
	opReleaseDir = 29
	opAccess     = 34
	opFallocate  = 43
)

// serveRing answers one request from a ring with the same chainFS methods that answer
// go-fuse's, each reply written straight into the ring entry's payload buffer.
func (fs *chainFS) serveRing(r *fuseuring.Request) {
	h := r.Header
	switch h.Opcode {
	case opRead, opWrite:
		// The ring of a CPU is served by one thread, and a loop device issues its requests
		// from few CPUs: large requests, whose copies take long, go to goroutines so that
		// the other CPUs share them.
		if in := (*fuse.ReadIn)(r.Input()); in.Size >= ringHandOff {
			go fs.serveIO(r, in)
		} else {
			fs.serveIO(r, in)
		}
	case opFsync:
		// fsync and fallocate may wait for the disk: off the ring's thread, which serves the
		// next request on this CPU meanwhile.
		in := (*fuse.FsyncIn)(r.Input())
		go func() { r.Reply(0, syscall.Errno(fs.Fsync(nil, in))) }()
	case opFallocate:
		in := (*fuse.FallocateIn)(r.Input())
		go func() { r.Reply(0, syscall.Errno(fs.Fallocate(nil, in))) }()
	case opGetAttr:
		var out fuse.AttrOut
		replyOut(r, fs.GetAttr(nil, (*fuse.GetAttrIn)(r.Input()), &out), &out)
	case opSetAttr:
		var out fuse.AttrOut
		replyOut(r, fs.SetAttr(nil, (*fuse.SetAttrIn)(r.Input()), &out), &out)
	case opLookup:
		var out fuse.EntryOut
		name, _, _ := strings.Cut(string(r.Payload), "\x00")
		replyOut(r, fs.Lookup(nil, h, name, &out), &out)
	case opOpen:
		var out fuse.OpenOut
		replyOut(r, fs.Open(nil, (*fuse.OpenIn)(r.Input()), &out), &out)
	case opOpenDir:
		var out fuse.OpenOut
		replyOut(r, fs.OpenDir(nil, (*fuse.OpenIn)(r.Input()), &out), &out)
	case opReadDir:
		in := (*fuse.ReadIn)(r.Input())
		list := fuse.NewDirEntryList(r.Buf[:min(int(in.Size), len(r.Buf))], in.Offset)
		st := fs.ReadDir(nil, in, list)
		r.Reply(len(list.Bytes()), syscall.Errno(st))
	case opStatFs:
		var out fuse.StatfsOut
		replyOut(r, fs.StatFs(nil, h, &out), &out)
	case opFlush, opRelease, opReleaseDir, opAccess:
		r.Reply(0, 0) // chainFS keeps no per-open state and checks no permissions
	default:
		r.Reply(0, syscall.ENOSYS)
	}
}

// ringHandOff is the size from which reads and writes are served off the ring's thread.
const ringHandOff = 128 << 10

// serveIO answers a READ or a WRITE (whose inputs share their first fields: node, handle,
// offset, size).
func (fs *chainFS) serveIO(r *fuseuring.Request, in *fuse.ReadIn) {
	if r.Header.Opcode == opWrite {
		n, st := fs.Write(nil, (*fuse.WriteIn)(unsafe.Pointer(in)), r.Payload[:min(int(in.Size), len(r.Payload))])
		replyOut(r, st, &fuse.WriteOut{Size: n})
		return
	}
	f := fs.file(in.NodeId)
	if f == nil {
		r.Reply(0, syscall.EBADF)
		return
	}
	n, err := f.chain.ReadAt(r.Buf[:min(int(in.Size), len(r.Buf))], int64(in.Offset))
	if err != nil {
		klog.ErrorS(err, "Read failed", "name", f.name, "offset", in.Offset, "size", in.Size)
		r.Reply(0, syscall.Errno(errnoOf(err)))
		return
	}
	r.Reply(n, 0)
}

// replyOut answers r with out's bytes, or with st alone when it is an error.
func replyOut[T any](r *fuseuring.Request, st fuse.Status, out *T) {
	if st != fuse.OK {
		r.Reply(0, syscall.Errno(st))
		return
	}
	n := copy(r.Buf, unsafe.Slice((*byte)(unsafe.Pointer(out)), unsafe.Sizeof(*out)))
	r.Reply(n, 0)
}

// mountForRings mounts the FUSE file system itself, so that the /dev/fuse descriptor is at
// hand for the rings (go-fuse serves it through its /dev/fd/N mount point). The options
// are those go-fuse's direct mount passes.
func mountForRings(mnt string, opts *fuse.MountOptions) (devFd int, err error) {
	devFd, err = unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,max_read=%d", devFd, os.Geteuid(), os.Getegid(), opts.MaxWrite)
	if err := unix.Mount(opts.FsName, mnt, "fuse."+opts.Name, unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(devFd)
		return -1, fmt.Errorf("mount %s: %w", mnt, err)
	}
	return devFd, nil
}
