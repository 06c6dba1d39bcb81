package o2u

import (
	"strings"
	"testing"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

func ptr(v float64) *float64 { return &v }

func TestGateReadsTheLabelAccuracyEstimate(t *testing.T) {
	summary := &o2uv1.DatasetSummary{
		EstimatedLabelAccuracy: 0.5,
		LabelAccuracy:          &o2uv1.LabelAccuracyEstimate{Mean: 0.93, Lower: 0.9, Upper: 0.96, Level: 0.95, Method: "exact"},
	}
	pass, err := Gate(summary, GateThresholds{MinLabelAccuracy: ptr(0.92), MaxNoiseRate: ptr(0.08)})
	if err != nil || !pass.Passed || pass.Lower != 0.9 || pass.Upper != 0.96 {
		t.Fatalf("want a pass with the interval, got %+v %v", pass, err)
	}
	if !strings.HasPrefix(pass.String(), "gate PASSED: label accuracy 93.00% (95% interval 90.00%-96.00%)") {
		t.Fatalf("unexpected text %q", pass.String())
	}
	fail, err := Gate(summary, GateThresholds{MinLabelAccuracy: ptr(0.95), MaxNoiseRate: ptr(0.05)})
	if err != nil || fail.Passed || len(fail.Reasons) != 2 || !strings.Contains(fail.String(), "gate FAILED") {
		t.Fatalf("want a failure with two reasons, got %+v %v", fail, err)
	}
}

func TestGateFallsBackAndChecksThresholds(t *testing.T) {
	summary := &o2uv1.DatasetSummary{EstimatedLabelAccuracy: 0.8}
	v, err := Gate(summary, GateThresholds{MaxNoiseRate: ptr(0.1)})
	if err != nil || v.Passed || v.LabelAccuracy != 0.8 || v.Lower != 0.8 {
		t.Fatalf("want the fallback to fail, got %+v %v", v, err)
	}
	if v, err := Gate(summary, GateThresholds{}); err != nil || !v.Passed {
		t.Fatalf("no thresholds always passes, got %+v %v", v, err)
	}
	if _, err := Gate(summary, GateThresholds{MaxNoiseRate: ptr(1.5)}); err == nil {
		t.Fatal("want an error for a threshold above 1")
	}
}
