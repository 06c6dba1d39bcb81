package o2u

import (
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

func TestCodecRoundTripsGeneratedMessages(t *testing.T) {
	in := &o2uv1.ScoringJob{
		JobId:      "job-1",
		State:      o2uv1.JobState_JOB_STATE_RUNNING,
		CreateTime: timestamppb.Now(),
		Config:     &o2uv1.ScoringConfig{Model: "mlp", Seed: proto.Int64(0), NoiseRate: proto.Float64(0.2)},
	}
	data, err := Codec().Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out := &o2uv1.ScoringJob{}
	if err := Codec().Unmarshal(data, out); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, out) {
		t.Fatalf("round trip changed the message: %v != %v", in, out)
	}
	// proto3 optional: an explicit zero must survive, an unset field must stay unset.
	if out.Config.Seed == nil || *out.Config.Seed != 0 || out.Config.NumCycles != nil {
		t.Fatalf("optional fields: seed %v num_cycles %v", out.Config.Seed, out.Config.NumCycles)
	}
	if Codec().Name() != "proto" {
		t.Fatalf("codec name %q", Codec().Name())
	}
}

func TestCodecHandlesOlderGeneratedMessages(t *testing.T) {
	in := &errdetails.ErrorInfo{Reason: "JOB_NOT_FOUND", Domain: Domain}
	data, err := Codec().Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out := &errdetails.ErrorInfo{}
	if err := Codec().Unmarshal(data, out); err != nil {
		t.Fatal(err)
	}
	if out.GetReason() != "JOB_NOT_FOUND" || out.GetDomain() != Domain {
		t.Fatalf("got %v", out)
	}
	if _, err := Codec().Marshal("not a message"); err == nil {
		t.Fatal("marshalling a non-message must fail")
	}
}
