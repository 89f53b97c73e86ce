// Package cow is the layer-chain engine of csi-rawcow: copy-on-write volumes made of
// sparse raw files.
//
// A volume is a chain of layers over an optional base image. Every layer is a plain
// sparse raw file at the volume's virtual size: offset X of a layer is offset X of the
// volume. Which blocks a layer holds is what the host file system says it holds
// (written extents; unwritten extents count as absent), plus a small per-layer zero
// list for ranges zeroed over lower data. A read is served by the highest layer that
// holds the block; only the top layer is writable; lower layers are frozen for good.
//
// The chain metadata (which layer backs which, sizes, names) lives beside the layer
// files in one manifest that is replaced atomically. Snapshots and clones add a layer
// and never copy data. docs/FORMAT.md describes the on-disk format.
//
// Layers that no longer change (frozen layers, bases) are read through shared read-only
// mappings, one per file and process (mapping.go); ReadView hands those bytes out in place
// for a server that replies with a vectored write.
//
// The package knows nothing of CSI, FUSE or loop devices: a Chain is an
// io.ReaderAt/io.WriterAt with a few verbs more (Discard, WriteZeroes, Flush, Snapshot).
package cow
