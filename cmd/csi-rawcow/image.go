package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// imageTool is one run of `csi-rawcow image`: where it writes, and where the store, the
// base images and the node's server are.
type imageTool struct {
	stdout   io.Writer
	stderr   io.Writer
	progress *os.File // where progress bars go, when it is a terminal
	cmd      string   // the subcommand, for messages

	// The flags as given; the directories they name come from the methods below.
	rootFlag  dirFlag // --root: ROOT/store is the store, ROOT/images the base images
	storeFlag dirFlag // --store: overrides ROOT/store
	runFlag   dirFlag // --run-dir: the node server's run directory
}

// dirFlag is a directory flag that remembers whether it was set, so that an explicit
// --root wins over $CSI_RAWCOW_STORE while an explicit --store wins over everything.
type dirFlag struct {
	value string
	set   bool
}

func (f *dirFlag) String() string { return f.value }
func (f *dirFlag) Set(s string) error {
	if s == "" {
		return errors.New("empty directory")
	}
	f.value, f.set = s, true
	return nil
}

// root is the node's root directory: --root, else $CSI_RAWCOW_ROOT, else /var/lib/csi-rawcow.
func (t *imageTool) root() string {
	if t.rootFlag.set {
		return t.rootFlag.value
	}
	return rootDirDefault()
}

// storeDir is the store: --store, else ROOT/store when --root is given, else
// $CSI_RAWCOW_STORE, else ROOT/store.
func (t *imageTool) storeDir() string {
	switch {
	case t.storeFlag.set:
		return t.storeFlag.value
	case t.rootFlag.set:
		return filepath.Join(t.rootFlag.value, "store")
	case os.Getenv("CSI_RAWCOW_STORE") != "":
		return os.Getenv("CSI_RAWCOW_STORE")
	}
	return filepath.Join(rootDirDefault(), "store")
}

// imagesDir holds the base images: ROOT/images.
func (t *imageTool) imagesDir() string { return filepath.Join(t.root(), "images") }

// locationFlags registers --root, --store and --run-dir on fs. The image tool takes them
// before the command and after it alike: `image --root R list` and `image list --root R`.
func (t *imageTool) locationFlags(fs *flag.FlagSet) {
	fs.Var(&t.rootFlag, "root", "the node's root `DIR`: DIR/store is the store, DIR/images the base images (default $CSI_RAWCOW_ROOT or "+defaultRootDir+")")
	fs.Var(&t.storeFlag, "store", "the store `DIR` (default ROOT/store, or $CSI_RAWCOW_STORE without --root)")
	fs.Var(&t.runFlag, "run-dir", "the run `DIR` of the node's server, which changes attached volumes (default $CSI_RAWCOW_RUN or "+defaultRunDir+")")
}

// runDir is the run directory of the node's server: --run-dir, else $CSI_RAWCOW_RUN, else
// /run/csi-rawcow.
func (t *imageTool) runDir() string {
	if t.runFlag.set {
		return t.runFlag.value
	}
	return runDirDefault()
}

// imageCommand is one subcommand of `csi-rawcow image`.
type imageCommand struct {
	name     string
	synopsis string // the arguments, for the usage line
	help     string // one line
	run      func(t *imageTool, fs *flag.FlagSet, args []string) error
}

// imageCommands in the order the usage lists them.
var imageCommands = []imageCommand{
	{"create", "[--base FILE | --image IMAGE] [--label KEY=VALUE]... NAME [SIZE]",
		"Create a volume of SIZE (10G, 512M, 4096; K/M/G/T/P/E are binary), over a raw base file or a base image if given.", imageCreate},
	{"import", "NAME FILE", "Import a raw or qcow2 image FILE as base image NAME (ROOT/images/NAME.raw) for volumes to build on.", imageImport},
	{"info", "[--json] NAME", "Describe a volume or snapshot and its layers, bottom first.", imageInfo},
	{"list", "[--json]", "List base images, volumes and snapshots.", imageList},
	{"map", "[--json] NAME", "Show which layer serves each extent of a volume or snapshot.", imageMap},
	{"snapshot", "[--label KEY=VALUE]... VOLUME SNAPSHOT", "Take a snapshot of a volume (O(1), nothing copied).", imageSnapshot},
	{"clone", "[--label KEY=VALUE]... SOURCE NAME", "Create volume NAME over a snapshot or a volume (O(1), nothing copied).", imageClone},
	{"resize", "NAME [+]SIZE", "Grow a volume to SIZE, or by SIZE with a leading '+'. Volumes never shrink.", imageResize},
	{"merge", "SNAPSHOT", "Delete a snapshot and merge its layer away, or free it, once no chain needs it.", imageMerge},
	{"delete", "NAME", "Delete a volume, or a snapshot (like merge).", imageDelete},
	{"rm", "IMAGE", "Remove base image IMAGE; refused while volumes or snapshots build on it.", imageRemove},
	{"flatten", "NAME FILE", "Write a volume or snapshot to FILE as one sparse plain raw image.", imageFlatten},
	{"localize-base", "[--json] NAME|LAYER", "Copy the base of volume or snapshot NAME (or base layer LAYER) into the store, once, when it lies on another file system: every chain over it reads the copy, and composed volumes share its blocks. The original file is left as it is.", imageLocalizeBase},
	{"check", "[--repair] [--json]", "Check the store; exit 1 when problems are found. --repair removes unused layers and stray files.", imageCheck},
	{"diff", "[--json] A B", "Show the extents that may differ between two volumes or snapshots.", imageDiff},
}

// Errors that end a subcommand with a particular exit status.
var (
	// errUsagePrinted: the flag package already told the user what was wrong, and how to call.
	errUsagePrinted = errors.New("usage")
	// errHelp: the user asked for the usage; it was printed.
	errHelp = errors.New("help")
)

// usageError is a bad command line: exit 2 after the subcommand's usage.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// exitStatus ends a subcommand with a status and no message (check with problems found).
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func imageMain(args []string) int {
	return runImage(args, os.Stdout, os.Stderr, os.Stderr)
}

// runImage runs `csi-rawcow image ARGS` and returns the exit status.
func runImage(args []string, stdout, stderr io.Writer, progress *os.File) int {
	t := &imageTool{stdout: stdout, stderr: stderr, progress: progress}
	global := flag.NewFlagSet("csi-rawcow image", flag.ContinueOnError)
	global.SetOutput(stderr)
	t.locationFlags(global)
	global.Usage = func() { imageUsage(global, stderr) }
	if err := global.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if global.NArg() == 0 {
		fmt.Fprintln(stderr, "csi-rawcow image: missing command")
		imageUsage(global, stderr)
		return 2
	}
	name, rest := global.Arg(0), global.Args()[1:]
	if name == "help" {
		imageUsage(global, stdout)
		return 0
	}
	i := slices.IndexFunc(imageCommands, func(c imageCommand) bool { return c.name == name })
	if i < 0 {
		fmt.Fprintf(stderr, "csi-rawcow image: unknown command %q\n", name)
		imageUsage(global, stderr)
		return 2
	}
	cmd := imageCommands[i]
	t.cmd = cmd.name
	fs := flag.NewFlagSet("csi-rawcow image "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	t.locationFlags(fs)
	fs.Usage = func() { commandUsage(fs, cmd, stderr) }
	err := cmd.run(t, fs, rest)
	var usage *usageError
	var status exitStatus
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errHelp):
		return 0
	case errors.Is(err, errUsagePrinted):
		return 2
	case errors.As(err, &usage):
		fmt.Fprintf(stderr, "csi-rawcow image %s: %s\n", cmd.name, oneLine(usage.msg))
		fs.Usage()
		return 2
	case errors.As(err, &status):
		return int(status)
	default:
		fmt.Fprintf(stderr, "csi-rawcow image %s: %s\n", cmd.name, oneLine(err.Error()))
		return 1
	}
}

// oneLine keeps an error on one line (errors.Join separates with newlines).
func oneLine(s string) string {
	return strings.ReplaceAll(strings.TrimSpace(s), "\n", "; ")
}

func imageUsage(global *flag.FlagSet, w io.Writer) {
	fmt.Fprintln(w, "usage: csi-rawcow image [--root DIR] [--store DIR] [--run-dir DIR] COMMAND [ARGS]")
	fmt.Fprintln(w, "\ncommands:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, c := range imageCommands {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.synopsis)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nflags:")
	global.SetOutput(w)
	global.PrintDefaults()
	fmt.Fprintln(w, "\nRun 'csi-rawcow image COMMAND -h' for a command's flags.")
}

func commandUsage(fs *flag.FlagSet, c imageCommand, w io.Writer) {
	fmt.Fprintf(w, "usage: csi-rawcow image [--root DIR] [--store DIR] %s %s\n\n%s\n\nflags:\n", c.name, c.synopsis, c.help)
	fs.PrintDefaults()
}

// parseArgs parses flags placed anywhere among the positional arguments (the flag package
// alone stops at the first one); "--" ends the flags.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, errHelp
			}
			return nil, errUsagePrinted
		}
		rest := fs.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// parsePositional parses args and requires between min and max positional arguments.
func parsePositional(fs *flag.FlagSet, args []string, min, max int) ([]string, error) {
	pos, err := parseArgs(fs, args)
	if err != nil {
		return nil, err
	}
	switch {
	case len(pos) < min:
		return nil, usagef("missing arguments")
	case len(pos) > max:
		return nil, usagef("too many arguments: %s", strings.Join(pos[max:], " "))
	}
	return pos, nil
}

// validateNames checks names before anything touches the store, so that a bad name
// changes nothing, not even by creating the store's directory.
// storeAndName parses a command's one NAME argument, checks it and opens the store.
func (t *imageTool) storeAndName(fs *flag.FlagSet, args []string) (*cow.Store, string, error) {
	pos, err := parsePositional(fs, args, 1, 1)
	if err != nil {
		return nil, "", err
	}
	if err := validateNames(pos[0]); err != nil {
		return nil, "", err
	}
	st, err := t.openStore(false)
	if err != nil {
		return nil, "", err
	}
	return st, pos[0], nil
}

func validateNames(names ...string) error {
	for _, n := range names {
		if err := cow.ValidateName(n); err != nil {
			return err
		}
	}
	return nil
}

// openStore opens the store. Only create may make a new one: every other command refuses
// a directory that is not a store, so a mistyped --store creates nothing.
func (t *imageTool) openStore(create bool) (*cow.Store, error) {
	dir := t.storeDir()
	if !create {
		if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("store %s does not exist (set --root or --store, or $CSI_RAWCOW_ROOT or $CSI_RAWCOW_STORE)", dir)
		} else if err != nil {
			return nil, fmt.Errorf("store %s: %w", dir, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "layers")); err != nil {
			return nil, fmt.Errorf("%s is not a csi-rawcow store: %w", dir, err)
		}
	}
	return cow.OpenStore(dir)
}

// storeExists reports whether the store has been made; only create makes one.
func (t *imageTool) storeExists() bool {
	_, err := os.Stat(filepath.Join(t.storeDir(), "layers"))
	return err == nil
}

// labelFlag collects repeated --label KEY=VALUE flags.
type labelFlag map[string]string

func (l *labelFlag) String() string {
	if l == nil || *l == nil {
		return ""
	}
	keys := make([]string, 0, len(*l))
	for k, v := range *l {
		keys = append(keys, k+"="+v)
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}

func (l *labelFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	if *l == nil {
		*l = labelFlag{}
	}
	(*l)[k] = v
	return nil
}

func labelsVar(fs *flag.FlagSet) *labelFlag {
	l := new(labelFlag)
	fs.Var(l, "label", "attach a `KEY=VALUE` label (repeatable)")
	return l
}

// sizeUnits are the binary multipliers of a size suffix, as qemu-img reads them.
var sizeUnits = map[string]int64{
	"": 1, "B": 1,
	"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60,
}

// parseSize reads a size like qemu-img: a number (a decimal fraction is allowed when the
// result is a whole number of bytes) and an optional binary unit K, M, G, T, P or E, in
// either case, optionally followed by B or iB: 10G, 1.5M, 512KiB, 4096.
func parseSize(s string) (int64, error) {
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(s)
	}
	num, unit := s[:i], strings.ToUpper(s[i:])
	if num == "" || strings.Count(num, ".") > 1 || num[0] == '.' || num[len(num)-1] == '.' {
		return 0, fmt.Errorf("invalid size %q: want a number and an optional unit (K, M, G, T, P, E)", s)
	}
	switch {
	case len(unit) == 3 && unit[1:] == "IB" && unit[0] != 'B':
		unit = unit[:1]
	case len(unit) == 2 && unit[1] == 'B' && unit[0] != 'B':
		unit = unit[:1]
	}
	mult, ok := sizeUnits[unit]
	if !ok {
		return 0, fmt.Errorf("invalid size %q: unknown unit %q (use K, M, G, T, P or E, optionally with B or iB)", s, s[i:])
	}
	r, ok := new(big.Rat).SetString(num)
	if !ok {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	r.Mul(r, new(big.Rat).SetInt64(mult))
	if !r.IsInt() {
		return 0, fmt.Errorf("invalid size %q: not a whole number of bytes", s)
	}
	if !r.Num().IsInt64() {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return r.Num().Int64(), nil
}

// humanSize formats n bytes with a binary unit, like qemu-img: 10 GiB, 1.5 MiB, 512 B.
func humanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v, u := float64(n), 0
	for math.Abs(v) >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	if u == 0 {
		return fmt.Sprintf("%d B", n)
	}
	s := strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.2f", v), "0"), ".")
	return s + " " + units[u]
}

func sizeWithBytes(n int64) string {
	return fmt.Sprintf("%s (%d bytes)", humanSize(n), n)
}

func (t *imageTool) printJSON(v any) error {
	enc := json.NewEncoder(t.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func imageCreate(t *imageTool, fs *flag.FlagSet, args []string) error {
	base := fs.String("base", "", "build on the raw image `FILE` (only ever read); SIZE defaults to its size")
	image := fs.String("image", "", "build on base `IMAGE` of the node (ROOT/images/IMAGE.raw, see import); SIZE defaults to its size")
	labels := labelsVar(fs)
	pos, err := parsePositional(fs, args, 1, 2)
	if err != nil {
		return err
	}
	if *base != "" && *image != "" {
		return usagef("--base and --image both name a base; give one")
	}
	if *image != "" {
		if err := validateNames(pos[0]); err != nil {
			return err
		}
		img, err := t.getImage(*image)
		if err != nil {
			return err
		}
		*base = img.Path
	}
	opts := cow.CreateOptions{Base: *base, Labels: *labels}
	if len(pos) == 2 {
		if opts.Size, err = parseSize(pos[1]); err != nil {
			return usagef("%v", err)
		}
		if opts.Size == 0 {
			return usagef("invalid size %q: a volume needs at least one byte", pos[1])
		}
	} else if *base == "" {
		return usagef("missing SIZE (needed without --base or --image)")
	}
	name := pos[0]
	if err := validateNames(name); err != nil {
		return err
	}
	st, err := t.openStore(true)
	if err != nil {
		return err
	}
	if err := st.Create(name, opts); err != nil {
		return err
	}
	info, err := st.Info(name)
	if err != nil {
		return err
	}
	fmt.Fprintf(t.stdout, "created volume %s: virtual size %s", name, sizeWithBytes(info.Size))
	if len(info.Layers) > 0 && info.Layers[0].State == cow.Base {
		fmt.Fprintf(t.stdout, ", base %s", info.Layers[0].Path)
	}
	fmt.Fprintln(t.stdout)
	return nil
}

func imageInfo(t *imageTool, fs *flag.FlagSet, args []string) error {
	asJSON := fs.Bool("json", false, "print the description as JSON")
	st, name, err := t.storeAndName(fs, args)
	if err != nil {
		return err
	}
	info, err := st.Info(name)
	if err != nil {
		return err
	}
	if *asJSON {
		return t.printJSON(info)
	}
	w := t.stdout
	fmt.Fprintf(w, "name:          %s\n", info.Name)
	fmt.Fprintf(w, "kind:          %s\n", info.Kind)
	fmt.Fprintf(w, "virtual size:  %s\n", sizeWithBytes(info.Size))
	if info.Source != "" {
		fmt.Fprintf(w, "source:        %s\n", info.Source)
	}
	fmt.Fprintf(w, "created:       %s\n", info.Created.Format("2006-01-02 15:04:05 MST"))
	if len(info.Labels) > 0 {
		l := labelFlag(info.Labels)
		fmt.Fprintf(w, "labels:        %s\n", l.String())
	}
	fmt.Fprintf(w, "layers:        %d (bottom first)\n", len(info.Layers))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  DEPTH\tID\tSTATE\tSIZE\tALLOCATED\tPATH")
	for i, l := range info.Layers {
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\n", i, l.ID, l.State, humanSize(l.Size), humanSize(l.Allocated), l.Path)
	}
	tw.Flush()
	if b := info.Layers[0]; b.Origin != "" {
		fmt.Fprintf(w, "base origin:   %s (copied into the store)\n", b.Origin)
	}
	fmt.Fprintf(w, "allocated:     %s in the store's layers (a base outside the store is not counted)\n", sizeWithBytes(info.Allocated))
	return nil
}

// describeAll returns the Info of every volume and snapshot, sorted by name. A name deleted
// meanwhile by someone else is left out.
func describeAll(st *cow.Store) ([]*cow.Info, error) {
	vols, err := st.Volumes()
	if err != nil {
		return nil, err
	}
	snaps, err := st.Snapshots()
	if err != nil {
		return nil, err
	}
	names := append(vols, snaps...)
	sort.Strings(names)
	out := []*cow.Info{}
	for _, n := range names {
		info, err := st.Info(n)
		if errors.Is(err, cow.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}

// listEntry is one row of list: a volume or snapshot as info describes it, or a base image
// (kind "image", its file as its one layer, with the chains that build on it).
type listEntry struct {
	*cow.Info
	Path  string   `json:"path,omitempty"`  // images: the image file
	Users []string `json:"users,omitempty"` // images: the volumes and snapshots built on it
}

func imageList(t *imageTool, fs *flag.FlagSet, args []string) error {
	asJSON := fs.Bool("json", false, "print the descriptions (as info --json gives them; images with their path and users) as a JSON array")
	if _, err := parsePositional(fs, args, 0, 0); err != nil {
		return err
	}
	// A node that has imported images but made no volume yet has no store: list the images.
	var st *cow.Store
	if t.storeExists() || !t.imagesExist() {
		var err error
		if st, err = t.openStore(false); err != nil {
			return err
		}
	}
	all, err := t.describeImages(st)
	if err != nil {
		return err
	}
	if st != nil {
		chains, err := describeAll(st)
		if err != nil {
			return err
		}
		for _, info := range chains {
			all = append(all, listEntry{Info: info})
		}
	}
	if *asJSON {
		return t.printJSON(all)
	}
	tw := tabwriter.NewWriter(t.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tKIND\tVIRTUAL SIZE\tALLOCATED\tLAYERS\tSOURCE")
	for _, e := range all {
		src, layers := e.Source, fmt.Sprint(len(e.Layers))
		if e.Kind == kindImage {
			src, layers = e.Path, "-"
			if len(e.Users) > 0 {
				src += fmt.Sprintf(" (base of %d)", len(e.Users))
			}
		}
		if src == "" {
			src = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", e.Name, e.Kind, humanSize(e.Size), humanSize(e.Allocated), layers, src)
	}
	return tw.Flush()
}

func imageMap(t *imageTool, fs *flag.FlagSet, args []string) error {
	asJSON := fs.Bool("json", false, "print the extents as a JSON array")
	st, name, err := t.storeAndName(fs, args)
	if err != nil {
		return err
	}
	c, err := st.OpenName(name)
	if err != nil {
		return busyHint(err)
	}
	entries := c.Map()
	if err := c.Close(); err != nil {
		return err
	}
	if entries == nil {
		entries = []cow.MapEntry{}
	}
	if *asJSON {
		return t.printJSON(entries)
	}
	tw := tabwriter.NewWriter(t.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "OFFSET\tLENGTH\tDEPTH\tLAYER")
	for _, e := range entries {
		depth, layer := "-", "zero"
		if e.Depth >= 0 {
			depth = fmt.Sprint(e.Depth)
		}
		if e.Data {
			layer = e.Layer
		}
		fmt.Fprintf(tw, "%#x\t%#x\t%s\t%s\n", e.Off, e.Len, depth, layer)
	}
	return tw.Flush()
}

// busyHint says what to do about a volume that is attached: read a snapshot of it instead.
func busyHint(err error) error {
	if errors.Is(err, cow.ErrBusy) {
		return fmt.Errorf("%w (snapshot it and use the snapshot)", err)
	}
	return err
}

// needKind fails unless name is a volume or snapshot of the given kind.
func needKind(st *cow.Store, name, kind, why string) (*cow.Info, error) {
	info, err := st.Info(name)
	if err != nil {
		return nil, err
	}
	if info.Kind != kind {
		return nil, fmt.Errorf("%s is a %s, not a %s%s", name, info.Kind, kind, why)
	}
	return info, nil
}

func imageSnapshot(t *imageTool, fs *flag.FlagSet, args []string) error {
	labels := labelsVar(fs)
	pos, err := parsePositional(fs, args, 2, 2)
	if err != nil {
		return err
	}
	vol, snap := pos[0], pos[1]
	if err := validateNames(vol, snap); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	if _, err := needKind(st, vol, "volume", ""); err != nil {
		return err
	}
	err = st.Snapshot(vol, snap, *labels)
	err = t.throughServer(st, vol, err, func(c *blockdev.Client) error { return c.Snapshot(vol, snap, *labels) })
	if err != nil {
		return err
	}
	info, err := st.Info(snap)
	if err != nil {
		return err
	}
	fmt.Fprintf(t.stdout, "created snapshot %s of volume %s: layer %s\n", snap, vol, info.Layers[len(info.Layers)-1].ID)
	return nil
}

func imageClone(t *imageTool, fs *flag.FlagSet, args []string) error {
	labels := labelsVar(fs)
	pos, err := parsePositional(fs, args, 2, 2)
	if err != nil {
		return err
	}
	src, name := pos[0], pos[1]
	if err := validateNames(src, name); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	err = st.Clone(src, name, *labels)
	err = t.throughServer(st, src, err, func(c *blockdev.Client) error { return c.Clone(src, name, *labels) })
	if err != nil {
		return err
	}
	info, err := st.Info(name)
	if err != nil {
		return err
	}
	fmt.Fprintf(t.stdout, "created volume %s from %s: virtual size %s, %d layers\n", name, src, sizeWithBytes(info.Size), len(info.Layers))
	return nil
}

func imageResize(t *imageTool, fs *flag.FlagSet, args []string) error {
	pos, err := parsePositional(fs, args, 2, 2)
	if err != nil {
		return err
	}
	name, arg := pos[0], pos[1]
	rel := strings.HasPrefix(arg, "+")
	size, err := parseSize(strings.TrimPrefix(arg, "+"))
	if err != nil {
		return usagef("%v", err)
	}
	if err := validateNames(name); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	info, err := needKind(st, name, "volume", ": only volumes can be resized")
	if err != nil {
		return err
	}
	if rel {
		if size > math.MaxInt64-info.Size {
			return fmt.Errorf("resize %s by %s: too large", name, arg)
		}
		size += info.Size
	}
	err = st.Resize(name, size)
	err = t.throughServer(st, name, err, func(c *blockdev.Client) error { return c.Resize(name, size) })
	if err != nil {
		if errors.Is(err, cow.ErrShrink) {
			return fmt.Errorf("%w; volumes only grow", err)
		}
		return err
	}
	after, err := st.Info(name)
	if err != nil {
		return err
	}
	fmt.Fprintf(t.stdout, "resized volume %s: %s -> %s\n", name, humanSize(info.Size), sizeWithBytes(after.Size))
	return nil
}

func imageMerge(t *imageTool, fs *flag.FlagSet, args []string) error {
	st, name, err := t.storeAndName(fs, args)
	if err != nil {
		return err
	}
	if _, err := needKind(st, name, "snapshot", "; use delete to remove a volume"); err != nil {
		return err
	}
	return t.deleteSnapshot(st, name)
}

func imageDelete(t *imageTool, fs *flag.FlagSet, args []string) error {
	pos, err := parsePositional(fs, args, 1, 1)
	if err != nil {
		return err
	}
	name := pos[0]
	if err := validateNames(name); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	info, err := st.Info(name)
	if err != nil {
		return err
	}
	if info.Kind == "snapshot" {
		return t.deleteSnapshot(st, name)
	}
	before, err := describeAll(st)
	if err != nil {
		return err
	}
	bar := newProgress(t.progress, "delete "+name)
	st.SetMergeProgress(bar.Update)
	err = st.DeleteVolume(name)
	st.SetMergeProgress(nil)
	if err != nil {
		bar.Abort()
		return t.attachedHint(st, name, err)
	}
	bar.Finish()
	after, err := describeAll(st)
	if err != nil {
		return err
	}
	// A layer of the volume that no chain has any more was freed, or, when other chains
	// built on it, merged into theirs. A base outside the store is never freed; one copied
	// into it goes with its last chain, like a layer.
	var freed, merged, kept int
	for _, l := range info.Layers {
		switch {
		case l.State == cow.Base && l.Origin == "":
		case len(layerUsers(after, l.ID)) > 0:
			kept++
		case len(layerUsers(before, l.ID, name)) > 0:
			merged++
		default:
			freed++
		}
	}
	fmt.Fprintf(t.stdout, "deleted volume %s; layers freed: %d, merged into other chains: %d, still used: %d", name, freed, merged, kept)
	fmt.Fprintf(t.stdout, "; store allocation %s -> %s\n", humanSize(storeAllocated(before)), humanSize(storeAllocated(after)))
	return nil
}

// deleteSnapshot deletes snapshot name and says what became of its layer: merged into the
// chains that built on it, freed, or kept because chains still need it as it is.
func (t *imageTool) deleteSnapshot(st *cow.Store, name string) error {
	before, err := describeAll(st)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(before, func(in *cow.Info) bool { return in.Name == name })
	if i < 0 {
		return fmt.Errorf("snapshot %s: %w", name, cow.ErrNotFound)
	}
	layer := before[i].Layers[len(before[i].Layers)-1]
	users := layerUsers(before, layer.ID, name)
	bar := newProgress(t.progress, "merge "+name)
	st.SetMergeProgress(bar.Update)
	err = st.DeleteSnapshot(name)
	st.SetMergeProgress(nil)
	if err != nil {
		bar.Abort()
		return err
	}
	bar.Finish()
	after, err := describeAll(st)
	if err != nil {
		return err
	}
	still := layerUsers(after, layer.ID)
	_, statErr := os.Stat(layer.Path)
	fileGone := errors.Is(statErr, fs.ErrNotExist)
	w := t.stdout
	fmt.Fprintf(w, "deleted snapshot %s; its layer %s ", name, layer.ID)
	switch {
	case len(still) > 0:
		fmt.Fprintf(w, "is still used by %s: kept until they no longer need it", strings.Join(still, ", "))
	case len(users) > 0 && fileGone:
		fmt.Fprintf(w, "was merged into the chains of %s", strings.Join(users, ", "))
	case fileGone:
		fmt.Fprintf(w, "was freed (%s)", humanSize(layer.Allocated))
	default:
		fmt.Fprintf(w, "is no longer used, but its file %s is still there (run check)", layer.Path)
	}
	fmt.Fprintf(w, "; store allocation %s -> %s\n", humanSize(storeAllocated(before)), humanSize(storeAllocated(after)))
	return nil
}

// layerUsers returns the names whose chains include layer id, except those in skip.
func layerUsers(all []*cow.Info, id string, skip ...string) []string {
	var names []string
	for _, info := range all {
		if slices.Contains(skip, info.Name) {
			continue
		}
		if slices.ContainsFunc(info.Layers, func(l cow.LayerInfo) bool { return l.ID == id }) {
			names = append(names, info.Name)
		}
	}
	return names
}

// storeAllocated is the space the layers of all chains take, each layer counted once.
func storeAllocated(all []*cow.Info) int64 {
	seen := map[string]bool{}
	var n int64
	for _, info := range all {
		for _, l := range info.Layers {
			if (l.State != cow.Base || l.Origin != "") && !seen[l.ID] {
				seen[l.ID] = true
				n += l.Allocated
			}
		}
	}
	return n
}

func imageFlatten(t *imageTool, fs *flag.FlagSet, args []string) error {
	pos, err := parsePositional(fs, args, 2, 2)
	if err != nil {
		return err
	}
	name, dst := pos[0], pos[1]
	if err := validateNames(name); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	bar := newProgress(t.progress, "flatten "+name)
	if err := st.Export(name, dst, bar.Update); err != nil {
		bar.Abort()
		return busyHint(err)
	}
	bar.Finish()
	var sys syscall.Stat_t
	if err := syscall.Stat(dst, &sys); err != nil {
		return fmt.Errorf("flattened %s, but: %w", name, err)
	}
	fmt.Fprintf(t.stdout, "flattened %s to %s: virtual size %s, %s allocated\n", name, dst, sizeWithBytes(sys.Size), humanSize(sys.Blocks*512))
	return nil
}

func imageLocalizeBase(t *imageTool, fs *flag.FlagSet, args []string) error {
	asJSON := fs.Bool("json", false, "print what was done as JSON")
	st, ref, err := t.storeAndName(fs, args)
	if err != nil {
		return err
	}
	bar := newProgress(t.progress, "copy the base of "+ref)
	start := time.Now()
	res, err := st.LocalizeBase(ref, bar.Update)
	if err != nil {
		bar.Abort()
		return err
	}
	bar.Finish()
	if *asJSON {
		return t.printJSON(res)
	}
	switch {
	case res.Copied:
		fmt.Fprintf(t.stdout, "copied base %s into the store as %s: virtual size %s, %s allocated, in %s; every chain over it reads the copy\n",
			res.Origin, res.Path, sizeWithBytes(res.Size), humanSize(res.Allocated), time.Since(start).Round(time.Millisecond))
	case res.Origin != "":
		fmt.Fprintf(t.stdout, "base %s was copied into the store already, as %s: nothing to do\n", res.Origin, res.Path)
	default:
		fmt.Fprintf(t.stdout, "base %s lies on the store's file system: volumes share its blocks as it is, nothing to do\n", res.Path)
	}
	return nil
}

// checkReport is what check --json prints.
type checkReport struct {
	Clean    bool          `json:"clean"`
	Problems []cow.Problem `json:"problems"`
	Removed  []string      `json:"removed,omitempty"` // files of layers/ that --repair removed
}

func imageCheck(t *imageTool, fs *flag.FlagSet, args []string) error {
	repair := fs.Bool("repair", false, "remove unused layers and stray files (nothing in use is touched)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if _, err := parsePositional(fs, args, 0, 0); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	layersDir := filepath.Join(st.Dir(), "layers")
	before := dirNames(layersDir)
	probs, err := st.Check(*repair)
	var repairErr error
	if err != nil && *repair {
		// Repair could not run (say, the manifest does not parse): still report what is wrong.
		repairErr = err
		probs, err = st.Check(false)
	}
	if err != nil {
		return err
	}
	if *repair && repairErr == nil && slices.ContainsFunc(probs, func(p cow.Problem) bool { return p.Subject == "manifest.json" }) {
		// The engine lists a manifest that does not parse as a problem and repairs nothing.
		repairErr = fmt.Errorf("%w: the manifest does not parse, so nothing was repaired", cow.ErrCorrupt)
	}
	rep := checkReport{Clean: len(probs) == 0, Problems: probs}
	if rep.Problems == nil {
		rep.Problems = []cow.Problem{}
	}
	if *repair {
		after := dirNames(layersDir)
		for _, n := range before {
			if !slices.Contains(after, n) {
				rep.Removed = append(rep.Removed, "layers/"+n)
			}
		}
	}
	if *asJSON {
		if err := t.printJSON(rep); err != nil {
			return err
		}
	} else {
		for _, r := range rep.Removed {
			fmt.Fprintf(t.stdout, "repaired: removed %s\n", r)
		}
		for _, p := range probs {
			fmt.Fprintln(t.stdout, p.String())
		}
		if rep.Clean {
			fmt.Fprintln(t.stdout, "No errors were found in the store.")
		} else {
			fmt.Fprintf(t.stdout, "%d %s found in the store.\n", len(probs), plural(len(probs), "problem was", "problems were"))
		}
	}
	if repairErr != nil {
		return fmt.Errorf("repair: %w", repairErr)
	}
	if !rep.Clean {
		return exitStatus(1)
	}
	return nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// dirNames lists the names in dir, sorted; nil when it cannot be read.
func dirNames(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names
}

// diffExtent is one range of diff --json.
type diffExtent struct {
	Off int64 `json:"start"`
	Len int64 `json:"length"`
}

// diffReport is what diff --json prints.
type diffReport struct {
	Extents []diffExtent `json:"extents"`
	Bytes   int64        `json:"bytes"`
}

func imageDiff(t *imageTool, fs *flag.FlagSet, args []string) error {
	asJSON := fs.Bool("json", false, "print the extents and the byte total as JSON")
	pos, err := parsePositional(fs, args, 2, 2)
	if err != nil {
		return err
	}
	if err := validateNames(pos...); err != nil {
		return err
	}
	st, err := t.openStore(false)
	if err != nil {
		return err
	}
	changed, err := st.Changed(pos[0], pos[1])
	if err != nil {
		return err
	}
	rep := diffReport{Extents: []diffExtent{}}
	for _, e := range changed {
		rep.Extents = append(rep.Extents, diffExtent{Off: e.Off, Len: e.Len})
		rep.Bytes += e.Len
	}
	if *asJSON {
		return t.printJSON(rep)
	}
	tw := tabwriter.NewWriter(t.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "OFFSET\tLENGTH")
	for _, e := range rep.Extents {
		fmt.Fprintf(tw, "%#x\t%#x\n", e.Off, e.Len)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(t.stdout, "%s in %d %s may differ between %s and %s\n", sizeWithBytes(rep.Bytes), len(rep.Extents),
		plural(len(rep.Extents), "extent", "extents"), pos[0], pos[1])
	return nil
}

// throughServer redoes a chain-changing operation through the node's server when err says
// that the volume is open in another process and that process is the server answering on
// the run directory: it alone may change the chain of a volume it serves (it quiesces the
// device's I/O). Any other error, or a busy volume no server of ours holds, is returned as
// it is, with the reason the server could not help.
func (t *imageTool) throughServer(st *cow.Store, volume string, err error, op func(c *blockdev.Client) error) error {
	if !errors.Is(err, cow.ErrBusy) {
		return err
	}
	c, _, why := t.serverHolding(st, volume)
	if c == nil {
		return fmt.Errorf("%w, and %s", err, why)
	}
	defer c.Close()
	if err := op(c); err != nil {
		return fmt.Errorf("volume %s is attached; through the server in %s: %w", volume, t.runDir(), err)
	}
	fmt.Fprintf(t.stderr, "csi-rawcow image %s: volume %s is attached; done through the server in %s\n", t.cmd, volume, t.runDir())
	return nil
}

// attachedHint says who holds a volume that cannot be deleted, and what to do about it.
func (t *imageTool) attachedHint(st *cow.Store, volume string, err error) error {
	if !errors.Is(err, cow.ErrBusy) {
		return err
	}
	c, a, _ := t.serverHolding(st, volume)
	if c == nil {
		return err
	}
	c.Close()
	return fmt.Errorf("%w: the server in %s has it attached as %s; detach it first (csi-rawcow detach %s)", err, t.runDir(), a.Device, volume)
}

// serverHolding returns a client of the server of the run directory when that server has
// volume of this store open: it lists the volume as attached, and it is the process that
// holds the volume's lock file in st (STORE/locks/NAME.lock, see docs/FORMAT.md). A server
// of another store that happens to have a volume of the same name is not ours to ask.
// Without a client, why says what is missing.
func (t *imageTool) serverHolding(st *cow.Store, volume string) (c *blockdev.Client, a blockdev.Attachment, why string) {
	runDir := t.runDir()
	pid, err := serverPID(runDir)
	if err != nil {
		return nil, a, fmt.Sprintf("no csi-rawcow server answers in %s (--run-dir) to do it there", runDir)
	}
	c, err = blockdev.Dial(runDir)
	if err != nil {
		return nil, a, fmt.Sprintf("the server in %s does not answer: %v", runDir, err)
	}
	as, err := c.List()
	if err != nil {
		c.Close()
		return nil, a, fmt.Sprintf("the server in %s does not answer: %v", runDir, err)
	}
	i := slices.IndexFunc(as, func(a blockdev.Attachment) bool { return a.Name == volume && !a.Stale })
	if i < 0 {
		c.Close()
		return nil, a, fmt.Sprintf("the server in %s does not serve it", runDir)
	}
	holders, err := lockHolders(filepath.Join(st.Dir(), "locks", volume+".lock"))
	if err != nil || !slices.Contains(holders, pid) {
		c.Close()
		return nil, a, fmt.Sprintf("the server in %s (process %d) serves a volume %s of another store", runDir, pid, volume)
	}
	return c, as[i], ""
}

// serverPID returns the process id of the server listening on runDir's control socket.
func serverPID(runDir string) (int, error) {
	conn, err := net.DialTimeout("unix", filepath.Join(runDir, blockdev.ControlSocket), 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	if cred.Pid <= 0 {
		return 0, fmt.Errorf("the server on %s runs in another pid namespace", runDir)
	}
	return int(cred.Pid), nil
}

// lockHolders returns the processes that hold a flock on the file at path, from /proc/locks
// (whose lines read "1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF"). Only the inode is
// compared: on btrfs the device /proc/locks shows is not the one stat reports.
func lockHolders(path string) ([]int, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, err
	}
	data, err := os.ReadFile("/proc/locks")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[1] != "FLOCK" { // blocked waiters read "1: -> FLOCK ..."
			continue
		}
		id := strings.Split(f[5], ":")
		if len(id) != 3 || id[2] != strconv.FormatUint(st.Ino, 10) {
			continue
		}
		if pid, err := strconv.Atoi(f[4]); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}
