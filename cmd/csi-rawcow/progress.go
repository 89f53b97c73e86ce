package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress draws a byte progress bar for a long operation, on a terminal only: scripts,
// pipes and tests see nothing. The zero value and a nil *progress are silent.
type progress struct {
	w    io.Writer
	desc string
	bar  *progressbar.ProgressBar // made at the first update, when the total is known
}

// newProgress returns a bar that writes to f when f is a terminal, else nil (silent).
func newProgress(f *os.File, desc string) *progress {
	if f == nil || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &progress{w: f, desc: desc}
}

// Update reports done bytes out of total; its shape fits cow.Store.Export's callback.
func (p *progress) Update(done, total int64) {
	if p == nil || total <= 0 {
		return
	}
	if p.bar == nil {
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetDescription(p.desc),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionShowTotalBytes(true),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(p.w) }),
		)
	}
	if total != p.bar.GetMax64() {
		p.bar.ChangeMax64(total)
	}
	p.bar.Set64(done)
}

// Finish draws the bar at 100% (when one was drawn) and ends its line.
func (p *progress) Finish() {
	if p == nil || p.bar == nil {
		return
	}
	p.bar.Finish()
}

// Abort ends the bar's line without claiming completion, so that an error message that
// follows starts on a line of its own.
func (p *progress) Abort() {
	if p == nil || p.bar == nil || p.bar.IsFinished() {
		return
	}
	p.bar.Exit() // ends the line through the completion hook
}
