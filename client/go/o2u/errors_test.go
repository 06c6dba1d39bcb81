package o2u

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/golang/protobuf/ptypes/duration"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func richStatus(t *testing.T) *status.Status {
	t.Helper()
	s, err := status.New(codes.ResourceExhausted, "queue is full").WithDetails(
		&errdetails.ErrorInfo{Reason: "QUEUE_FULL", Domain: Domain, Metadata: map[string]string{"limit": "100"}},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "dataset.uri", Description: "must be s3:// or file://"},
		}},
		&errdetails.ResourceInfo{ResourceType: "scoring_job", ResourceName: "job-1"},
		&errdetails.RetryInfo{RetryDelay: &duration.Duration{Seconds: 2, Nanos: 500000000}},
	)
	if err != nil {
		t.Fatalf("building status: %v", err)
	}
	return s
}

func TestFromStatusUnpacksEveryDetail(t *testing.T) {
	e := FromStatus(richStatus(t))
	if e.Code != codes.ResourceExhausted || e.Message != "queue is full" {
		t.Fatalf("code/message: %v %q", e.Code, e.Message)
	}
	if e.Reason != "QUEUE_FULL" || e.Domain != Domain || e.Metadata["limit"] != "100" {
		t.Fatalf("error info: %q %q %v", e.Reason, e.Domain, e.Metadata)
	}
	want := []FieldViolation{{Field: "dataset.uri", Description: "must be s3:// or file://"}}
	if len(e.FieldViolations) != 1 || e.FieldViolations[0] != want[0] {
		t.Fatalf("field violations: %+v", e.FieldViolations)
	}
	if e.ResourceType != "scoring_job" || e.ResourceName != "job-1" {
		t.Fatalf("resource info: %q %q", e.ResourceType, e.ResourceName)
	}
	if e.RetryDelay != 2500*time.Millisecond {
		t.Fatalf("retry delay: %v", e.RetryDelay)
	}
	wantText := "ResourceExhausted: queue is full [QUEUE_FULL] (field dataset.uri: must be s3:// or file://)"
	if e.Error() != wantText {
		t.Fatalf("Error() = %q, want %q", e.Error(), wantText)
	}
}

func TestFromStatusWithoutDetails(t *testing.T) {
	if FromStatus(status.New(codes.OK, "")) != nil {
		t.Fatal("OK status must give nil")
	}
	e := FromStatus(status.New(codes.NotFound, "no such job"))
	if e.Reason != "" || e.Metadata != nil || e.FieldViolations != nil || e.RetryDelay != 0 {
		t.Fatalf("unexpected details: %+v", e)
	}
	if e.Error() != "NotFound: no such job" {
		t.Fatalf("Error() = %q", e.Error())
	}
}

func TestWrappedErrorKeepsStatusAndHelpers(t *testing.T) {
	s := richStatus(t)
	err := fmt.Errorf("submitting: %w", wrapError(context.Background(), s.Err()))
	e, ok := AsError(err)
	if !ok || e.Reason != "QUEUE_FULL" {
		t.Fatalf("AsError: %v %v", e, ok)
	}
	if status.Code(e) != codes.ResourceExhausted || e.GRPCStatus().Message() != "queue is full" {
		t.Fatal("GRPCStatus must return the original status")
	}
	if Code(err) != codes.ResourceExhausted || Reason(err) != "QUEUE_FULL" || !IsResourceExhausted(err) {
		t.Fatalf("helpers: %v %q", Code(err), Reason(err))
	}
	if IsNotFound(err) || IsUnavailable(err) || IsInvalidArgument(err) {
		t.Fatal("helpers matched the wrong code")
	}
	if !IsRetryable(err) {
		t.Fatal("RESOURCE_EXHAUSTED with a retry delay is retryable")
	}
	if !errors.Is(err, &Error{Code: codes.ResourceExhausted}) || !errors.Is(err, &Error{Code: codes.ResourceExhausted, Reason: "QUEUE_FULL"}) {
		t.Fatal("errors.Is by code and reason")
	}
	if errors.Is(err, &Error{Code: codes.ResourceExhausted, Reason: "DATASET_TOO_LARGE"}) {
		t.Fatal("errors.Is must compare the reason when given")
	}
}

func TestRetryableCodes(t *testing.T) {
	cases := map[codes.Code]bool{
		codes.Unavailable:        true,
		codes.ResourceExhausted:  false, // without RetryInfo: a limit the same request will hit again
		codes.NotFound:           false,
		codes.InvalidArgument:    false,
		codes.Unauthenticated:    false,
		codes.FailedPrecondition: false,
	}
	for code, want := range cases {
		err := wrapError(context.Background(), status.Error(code, "x"))
		if got := IsRetryable(err); got != want {
			t.Errorf("IsRetryable(%v) = %v, want %v", code, got, want)
		}
	}
}

func TestContextErrorsPassThrough(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := wrapError(ctx, status.Error(codes.Canceled, "context canceled"))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if wrapError(context.Background(), nil) != nil {
		t.Fatal("nil must stay nil")
	}
	plain := errors.New("not a status")
	if wrapError(context.Background(), plain) != plain {
		t.Fatal("an error without a status must pass through")
	}
	if Code(nil) != codes.OK || Code(plain) != codes.Unknown {
		t.Fatal("Code of nil and of a plain error")
	}
}
