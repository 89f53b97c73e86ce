// Command csi-rawcow is the one binary of csi-rawcow: the CSI driver, the image tool and
// the attach/detach helpers, chosen by the first argument.
package main

import (
	"fmt"
	"os"
	"sort"
)

// version is stamped at build time: -ldflags "-X main.version=..."
var version = "dev"

// commands maps each subcommand to its entry point, which gets the remaining arguments
// and returns the process exit code.
var commands = map[string]func(args []string) int{
	"driver":    driverMain,
	"image":     imageMain,
	"serve":     serveMain,
	"registrar": registrarMain,
	"attach":    attachMain,
	"detach":    detachMain,
	"version":   func([]string) int { fmt.Println(version); return 0 },
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: csi-rawcow COMMAND [ARGS]\ncommands: %v\n", names)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	cmd, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "csi-rawcow: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	os.Exit(cmd(os.Args[2:]))
}
