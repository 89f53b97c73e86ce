// Command fusefloor serves one file from memory over FUSE, with the csi-rawcow server's mount
// options and open flags, for bench/fio.sh to measure what any FUSE server can reach on this
// machine: the floor of the FUSE path under a loop device. Reads are answered from memory in
// place (the kernel copies once, as for csi-rawcow's mapped layers); writes are copied once
// into memory (any server that keeps the data must copy it at least once after reading the
// request). There is no engine, no file system under it and no lock.
//
//	fusefloor --mount DIR [--size 1G]
//
// The file is DIR/disk; SIGTERM or SIGINT unmounts and exits.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
)

const diskNode = fuse.FUSE_ROOT_ID + 1

func main() {
	mnt := flag.String("mount", "", "mount point (created if missing)")
	size := flag.Int64("size", 1<<30, "size of the file in bytes, held in memory")
	flag.Parse()
	if *mnt == "" || *size <= 0 || *size%4096 != 0 {
		fmt.Fprintln(os.Stderr, "usage: fusefloor --mount DIR [--size BYTES, a multiple of 4096]")
		os.Exit(2)
	}
	if err := run(*mnt, *size); err != nil {
		fmt.Fprintf(os.Stderr, "fusefloor: %v\n", err)
		os.Exit(1)
	}
}

func run(mnt string, size int64) error {
	mem := make([]byte, size)
	for i := range mem { // not the shared zero page: reads copy real memory
		mem[i] = byte(i*7 + i>>12)
	}
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return err
	}
	opts := blockdev.MountOptions(blockdev.Options{})
	opts.FsName, opts.Name = "rawcow-fusefloor", "rawcow-fusefloor"
	srv, err := fuse.NewServer(&memFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), mem: mem}, mnt, opts)
	if err != nil {
		return fmt.Errorf("mount %s: %w", mnt, err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		srv.Unmount()
		return fmt.Errorf("mount %s: %w", mnt, err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return srv.Unmount()
}

// memFS is a flat file system with one file, "disk", held in mem.
type memFS struct {
	fuse.RawFileSystem
	mem []byte
}

func (fs *memFS) fillAttr(node uint64, a *fuse.Attr) bool {
	a.Ino = node
	switch node {
	case fuse.FUSE_ROOT_ID:
		a.Mode, a.Nlink = syscall.S_IFDIR|0o755, 2
	case diskNode:
		a.Mode, a.Nlink, a.Size = syscall.S_IFREG|0o600, 1, uint64(len(fs.mem))
	default:
		return false
	}
	return true
}

func (fs *memFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != fuse.FUSE_ROOT_ID || name != "disk" {
		return fuse.ENOENT
	}
	out.NodeId = diskNode
	out.SetEntryTimeout(time.Hour)
	out.SetAttrTimeout(time.Hour)
	fs.fillAttr(diskNode, &out.Attr)
	return fuse.OK
}

func (fs *memFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if !fs.fillAttr(in.NodeId, &out.Attr) {
		return fuse.ENOENT
	}
	out.SetTimeout(time.Hour)
	return fuse.OK
}

func (fs *memFS) Access(_ <-chan struct{}, _ *fuse.AccessIn) fuse.Status { return fuse.OK }

func (fs *memFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != diskNode {
		return fuse.ENOENT
	}
	out.OpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES // as csi-rawcow
	return fuse.OK
}

func (fs *memFS) Read(_ <-chan struct{}, in *fuse.ReadIn, _ []byte) (fuse.ReadResult, fuse.Status) {
	off := min(int64(in.Offset), int64(len(fs.mem)))
	end := min(off+int64(in.Size), int64(len(fs.mem)))
	return fuse.ReadResultData(fs.mem[off:end]), fuse.OK
}

func (fs *memFS) Write(_ <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if int64(in.Offset)+int64(len(data)) > int64(len(fs.mem)) {
		return 0, fuse.Status(syscall.EFBIG)
	}
	return uint32(copy(fs.mem[in.Offset:], data)), fuse.OK
}

func (fs *memFS) Fallocate(_ <-chan struct{}, _ *fuse.FallocateIn) fuse.Status { return fuse.OK }

func (fs *memFS) Fsync(_ <-chan struct{}, _ *fuse.FsyncIn) fuse.Status { return fuse.OK }

func (fs *memFS) Flush(_ <-chan struct{}, _ *fuse.FlushIn) fuse.Status { return fuse.OK }

func (fs *memFS) Release(_ <-chan struct{}, _ *fuse.ReleaseIn) {}
