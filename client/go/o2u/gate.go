package o2u

// Acceptance gate: accept or reject a batch from its dataset summary, as `o2u score
// --max-noise-rate/--min-label-accuracy` does in the Python client.
//
// The decision reads the batch's expected label accuracy (DatasetSummary.label_accuracy.mean,
// from the per-sample noise probabilities as a Poisson-binomial count of wrong labels); the 95%
// interval is reported with it. A summary without the estimate falls back to
// estimated_label_accuracy with an interval of that one point.

import (
	"fmt"
	"strings"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

// ExitGateFailed is the exit status of a command whose batch failed the gate.
const ExitGateFailed = 20

// GateThresholds are the gate's requirements; a nil field is not checked.
type GateThresholds struct {
	MaxNoiseRate     *float64
	MinLabelAccuracy *float64
}

// GateVerdict is the gate's decision with the accuracy, its interval and why it failed.
type GateVerdict struct {
	Passed        bool
	LabelAccuracy float64
	Lower         float64
	Upper         float64
	Level         float64
	NoiseRate     float64
	Reasons       []string
}

// String is a one-line verdict, e.g. "gate PASSED: label accuracy 93.10% (95% interval ...)".
func (v GateVerdict) String() string {
	verdict := "PASSED"
	if !v.Passed {
		verdict = "FAILED"
	}
	text := fmt.Sprintf("gate %s: label accuracy %.2f%% (%.0f%% interval %.2f%%-%.2f%%), noise rate %.2f%%",
		verdict, 100*v.LabelAccuracy, 100*v.Level, 100*v.Lower, 100*v.Upper, 100*v.NoiseRate)
	if !v.Passed {
		text += "; " + strings.Join(v.Reasons, "; ")
	}
	return text
}

// Gate returns the verdict on a finished job's summary; thresholds outside [0, 1] are an error.
func Gate(summary *o2uv1.DatasetSummary, t GateThresholds) (GateVerdict, error) {
	for name, value := range map[string]*float64{"MaxNoiseRate": t.MaxNoiseRate, "MinLabelAccuracy": t.MinLabelAccuracy} {
		if value != nil && (*value < 0 || *value > 1) {
			return GateVerdict{}, fmt.Errorf("o2u: %s must be between 0 and 1, got %g", name, *value)
		}
	}
	v := GateVerdict{}
	if estimate := summary.GetLabelAccuracy(); estimate != nil {
		v.LabelAccuracy, v.Lower, v.Upper, v.Level = estimate.GetMean(), estimate.GetLower(), estimate.GetUpper(), estimate.GetLevel()
	} else {
		v.LabelAccuracy = summary.GetEstimatedLabelAccuracy()
		v.Lower, v.Upper = v.LabelAccuracy, v.LabelAccuracy
	}
	v.NoiseRate = 1 - v.LabelAccuracy
	if t.MinLabelAccuracy != nil && v.LabelAccuracy < *t.MinLabelAccuracy {
		v.Reasons = append(v.Reasons, fmt.Sprintf("label accuracy %.2f%% is below the minimum %.2f%%", 100*v.LabelAccuracy, 100**t.MinLabelAccuracy))
	}
	if t.MaxNoiseRate != nil && v.NoiseRate > *t.MaxNoiseRate {
		v.Reasons = append(v.Reasons, fmt.Sprintf("noise rate %.2f%% is above the maximum %.2f%%", 100*v.NoiseRate, 100**t.MaxNoiseRate))
	}
	v.Passed = len(v.Reasons) == 0
	return v, nil
}
