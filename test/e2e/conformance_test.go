//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// The External Storage suite of Kubernetes' own e2e tests (e2e.test of the cluster's version,
// built by build-k8s.sh conformance) against csi-rawcow as deploy/kubernetes/test-driver.yaml
// describes it, run by the ginkgo CLI in parallel processes.
//
//	CSI_RAWCOW_CONFORMANCE=ci    (default) provisioning, volumes, snapshottable, volume-expand,
//	                             volumeMode and the other quick suites, without [Slow] and [Serial]
//	CSI_RAWCOW_CONFORMANCE=full  all of it but [Disruptive] and the populator spec (`make conformance`)
//	CSI_RAWCOW_CONFORMANCE_REPORT=DIR  keeps ginkgo's JSON report and the summary there
//	CSI_RAWCOW_CONFORMANCE_FOCUS / _SKIP  override the selection (regular expressions)
var conformanceRuns = map[string]struct{ focus, skip string }{
	"ci": {
		focus: `External.Storage.*(provisioning|volumes|snapshottable|volume-expand|volumeMode|multiVolume|ephemeral|readwriteoncepod|capacity|topology)`,
		skip:  `\[Slow\]|\[Serial\]|\[Disruptive\]|\[Feature:VolumeAttributesClass\]|volumegroupsnapshot`,
	},
	"full": {
		focus: `External.Storage`,
		// "any volume data source" deploys hello-populator and volume-data-source-validator,
		// whose images cannot be had offline (no registry, and their modules are not on the
		// Go module proxy)
		skip: `\[Disruptive\]|any volume data source`,
	},
}

func TestExternalStorage(t *testing.T) {
	mode := os.Getenv("CSI_RAWCOW_CONFORMANCE")
	if mode == "" {
		mode = "ci"
	}
	run, ok := conformanceRuns[mode]
	if !ok {
		t.Fatalf("CSI_RAWCOW_CONFORMANCE=%q: want ci or full", mode)
	}
	if f := os.Getenv("CSI_RAWCOW_CONFORMANCE_FOCUS"); f != "" {
		run.focus = f
	}
	if s := os.Getenv("CSI_RAWCOW_CONFORMANCE_SKIP"); s != "" {
		run.skip = s
	}
	e := cluster(t)
	driverDeployed(t)
	bin := e.paths["CONFORMANCE_BIN"]
	if err := buildConformanceImages(e.node, e.bbLayer, e.paths["ROOTFS_LAYER"], filepath.Join(bin, "agnhost")); err != nil {
		t.Fatal(err)
	}
	report := os.Getenv("CSI_RAWCOW_CONFORMANCE_REPORT")
	if report == "" {
		report = filepath.Join(e.work, "conformance")
	}
	if err := os.MkdirAll(report, 0o755); err != nil {
		t.Fatal(err)
	}
	procs := "4" // the specs mostly wait for pods and the API server: more processes than cores
	timeout := map[string]string{"ci": "40m", "full": "4h"}[mode]
	args := []string{
		"--procs=" + procs, "--timeout=" + timeout, "--no-color", "--succinct",
		"--focus=" + run.focus, "--skip=" + run.skip,
		"--json-report=report.json", "--output-dir=" + report,
		filepath.Join(bin, "e2e.test"), "--",
		"--kubeconfig=" + e.cp.kubeconfig, "--provider=skeleton",
		"--repo-root=" + e.repo,
		"--storage.testdriver=" + filepath.Join(e.repo, "deploy", "kubernetes", "test-driver.yaml"),
	}
	log := filepath.Join(report, "e2e.log")
	out, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	start := time.Now()
	cmd := exec.CommandContext(context.Background(), filepath.Join(bin, "ginkgo"), args...)
	cmd.Dir = report
	cmd.Stdout, cmd.Stderr = out, out
	runErr := cmd.Run()
	took := time.Since(start).Round(time.Second)
	sum, err := summarize(filepath.Join(report, "report.json"))
	if err != nil {
		t.Fatalf("ginkgo: %v; %v (log %s)\n%s", runErr, err, log, tailFile(log, 60))
	}
	summary := fmt.Sprintf("External Storage (%s) in %v: %d passed, %d failed, %d skipped, of %d selected\n%s",
		mode, took, sum.passed, len(sum.failed), sum.skipped, sum.selected, sum.skipReasons())
	if werr := os.WriteFile(filepath.Join(report, "summary.txt"), []byte(summary), 0o644); werr != nil {
		t.Error(werr)
	}
	fmt.Fprint(os.Stderr, summary) // in CI's log too, which runs without -v
	for _, f := range sum.failed {
		t.Errorf("FAILED: %s", f)
	}
	if runErr != nil && len(sum.failed) == 0 {
		t.Errorf("ginkgo: %v (log %s)\n%s", runErr, log, tailFile(log, 60))
	}
	if sum.passed == 0 {
		t.Errorf("no spec passed (log %s)", log)
	}
}

// suiteSummary counts the specs of a ginkgo JSON report that ran or were skipped at run
// time (specs the focus left out are not counted), with the skip messages grouped.
type suiteSummary struct {
	selected, passed, skipped int
	failed                    []string
	skips                     map[string]int
}

// ginkgoReport is the part of ginkgo v2's JSON report this reads.
type ginkgoReport []struct {
	SpecReports []struct {
		LeafNodeText            string
		ContainerHierarchyTexts []string
		State                   string
		Failure                 *struct{ Message string }
		LeafNodeType            string
	}
}

func summarize(path string) (*suiteSummary, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var rep ginkgoReport
	if err := json.Unmarshal(data, &rep); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s := &suiteSummary{skips: map[string]int{}}
	for _, suite := range rep {
		for _, sp := range suite.SpecReports {
			if sp.LeafNodeType != "It" {
				continue
			}
			name := strings.Join(append(sp.ContainerHierarchyTexts, sp.LeafNodeText), " ")
			switch sp.State {
			case "passed":
				s.selected++
				s.passed++
			case "skipped":
				if sp.Failure == nil { // left out by the focus or the skip: not selected
					continue
				}
				s.selected++
				s.skipped++
				s.skips[skipCategory(sp.Failure.Message)]++
			case "pending":
			default: // failed, panicked, interrupted, aborted, timedout
				s.selected++
				msg := ""
				if sp.Failure != nil {
					msg = sp.Failure.Message
					if len(msg) > 300 {
						msg = msg[:300] + "..."
					}
				}
				s.failed = append(s.failed, fmt.Sprintf("%s [%s]: %s", name, sp.State, msg))
			}
		}
	}
	return s, nil
}

// skipCategory reduces a skip message to its reason: the quoted names of drivers and
// volume types vary per spec.
var skipDetail = regexp.MustCompile(`"[^"]*"`)

func skipCategory(msg string) string {
	msg = strings.TrimSpace(strings.SplitN(msg, "\n", 2)[0])
	return skipDetail.ReplaceAllString(msg, `"…"`)
}

func (s *suiteSummary) skipReasons() string {
	type kv struct {
		reason string
		n      int
	}
	var l []kv
	for r, n := range s.skips {
		l = append(l, kv{r, n})
	}
	sort.Slice(l, func(i, j int) bool { return l[i].n > l[j].n || l[i].n == l[j].n && l[i].reason < l[j].reason })
	var b strings.Builder
	for _, x := range l {
		fmt.Fprintf(&b, "  %4d skipped: %s\n", x.n, x.reason)
	}
	return b.String()
}
