package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
	"o2u.dev/o2u/o2u"
)

const hostile = "\x1b[31mred\x1b[0m \x1b]0;owned\x07 \u202egnp.exe \r\n\x08"

// noControls fails when text still holds a character that would act on the terminal.
func noControls(t *testing.T, text string) {
	t.Helper()
	for _, c := range []string{"\x1b", "\x07", "\u202e", "\r", "\x08"} {
		if strings.Contains(text, c) {
			t.Fatalf("%q holds %q", text, c)
		}
	}
}

func TestSafeTextEscapesWhatWouldActAndKeepsTheRest(t *testing.T) {
	// The same escapes as the Python CLI's safe_text.
	want := `\x1b[31mred\x1b[0m \x1b]0;owned\x07 \u202egnp.exe \r\n\x08`
	if got := safeText(hostile); got != want {
		t.Fatalf("got %s", got)
	}
	if got := safeText("café ✓ 日本 batch-42"); got != "café ✓ 日本 batch-42" {
		t.Fatalf("got %q", got)
	}
	if got := safeText("bad \xff byte \u0085 \u2066"); got != `bad \xff byte \x85 \u2066` {
		t.Fatalf("got %s", got)
	}
}

func TestEventsAndErrorsPrintHostileTextEscaped(t *testing.T) {
	line := formatEvent(&o2uv1.JobEvent{Sequence: 3, Type: o2uv1.JobEventType_JOB_EVENT_TYPE_STATE_CHANGED, State: o2uv1.JobState_JOB_STATE_FAILED, Message: hostile})
	noControls(t, line)
	if !strings.Contains(line, `\x1b[31mred`) {
		t.Fatalf("got %q", line)
	}
	noControls(t, labelName(3, hostile))

	var stderr bytes.Buffer
	report(&stderr, &o2u.Error{
		Code: codes.NotFound, Message: "file:///" + hostile, Reason: hostile,
		FieldViolations: []o2u.FieldViolation{{Field: hostile, Description: hostile}},
		ResourceType:    "dataset", ResourceName: hostile,
	})
	noControls(t, stderr.String())
	if !strings.Contains(stderr.String(), `\x1b]0;owned`) {
		t.Fatalf("got %q", stderr.String())
	}
}

func TestAFailedSubmitReportsItsRequestID(t *testing.T) {
	var stderr bytes.Buffer
	status := report(&stderr, &o2u.SubmitError{RequestID: "2b1f0c4e-8d0e-4c47-9a39-2f55d3c1e0a7", Err: context.DeadlineExceeded})
	if status != 1 || !strings.Contains(stderr.String(), "rerun with -request-id 2b1f0c4e-8d0e-4c47-9a39-2f55d3c1e0a7") {
		t.Fatalf("status %d, %q", status, stderr.String())
	}
	stderr.Reset()
	report(&stderr, &o2u.SubmitError{RequestID: "x", Err: &o2u.Error{Code: codes.InvalidArgument, Message: "bad"}})
	if strings.Contains(stderr.String(), "request id") {
		t.Fatalf("a refused submission created nothing: %q", stderr.String())
	}
}
