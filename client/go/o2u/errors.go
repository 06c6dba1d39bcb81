package o2u

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain is the google.rpc.ErrorInfo domain of errors raised by the o2u service.
const Domain = "o2u.dev"

// FieldViolation names a request field that was rejected, from google.rpc.BadRequest.
type FieldViolation struct {
	Field       string
	Description string
}

// Error is a failed call with the server's google.rpc details unpacked. Every error returned
// by a Client method for a failed RPC is an *Error (use errors.As or AsError); errors raised
// before a call is made (bad options, cancelled context) are returned as they are.
type Error struct {
	// Code is the canonical gRPC status code.
	Code codes.Code
	// Message is the status message, written for a person.
	Message string
	// Reason is the UPPER_SNAKE_CASE google.rpc.ErrorInfo reason, e.g. "JOB_NOT_FOUND".
	Reason string
	// Domain is the ErrorInfo domain; Domain ("o2u.dev") for errors raised by the service.
	Domain string
	// Metadata is the ErrorInfo metadata (e.g. the limit that was hit).
	Metadata map[string]string
	// FieldViolations lists the request fields at fault (google.rpc.BadRequest).
	FieldViolations []FieldViolation
	// ResourceType and ResourceName name the missing or locked resource (google.rpc.ResourceInfo).
	ResourceType string
	ResourceName string
	// RetryDelay is how long the server asks callers to wait before retrying
	// (google.rpc.RetryInfo); zero when the server gave no advice.
	RetryDelay time.Duration

	status *status.Status
}

// Error implements error: "<Code>: <message> [<reason>]".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Code.String())
	b.WriteString(": ")
	b.WriteString(e.Message)
	if e.Reason != "" {
		fmt.Fprintf(&b, " [%s]", e.Reason)
	}
	for _, v := range e.FieldViolations {
		fmt.Fprintf(&b, " (field %s: %s)", v.Field, v.Description)
	}
	return b.String()
}

// GRPCStatus returns the original status, so status.FromError and status.Code keep working
// on errors returned by the Client.
func (e *Error) GRPCStatus() *status.Status {
	if e.status == nil {
		return status.New(e.Code, e.Message)
	}
	return e.status
}

// Is reports whether target is an *Error with the same Code and, when target's Reason is set,
// the same Reason; so errors.Is(err, &o2u.Error{Code: codes.NotFound}) works.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	return t.Code == e.Code && (t.Reason == "" || t.Reason == e.Reason)
}

// FromStatus unpacks a status and its ErrorInfo, BadRequest, ResourceInfo and RetryInfo
// details; it returns nil for an OK status.
func FromStatus(s *status.Status) *Error {
	if s == nil || s.Code() == codes.OK {
		return nil
	}
	e := &Error{Code: s.Code(), Message: s.Message(), status: s}
	for _, detail := range s.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.Reason = d.GetReason()
			e.Domain = d.GetDomain()
			if len(d.GetMetadata()) > 0 {
				e.Metadata = make(map[string]string, len(d.GetMetadata()))
				for k, v := range d.GetMetadata() {
					e.Metadata[k] = v
				}
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.ResourceInfo:
			e.ResourceType = d.GetResourceType()
			e.ResourceName = d.GetResourceName()
		case *errdetails.RetryInfo:
			// Getters instead of a duration helper: the field's Go type differs between
			// genproto releases, the accessors do not.
			delay := d.GetRetryDelay()
			e.RetryDelay = time.Duration(delay.GetSeconds())*time.Second + time.Duration(delay.GetNanos())
		}
	}
	return e
}

// wrapError turns an error returned by a gRPC call into an *Error. A context error of the
// caller's own context stays as it is, so errors.Is(err, context.Canceled) keeps working.
func wrapError(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	if ctxErr := ctx.Err(); ctxErr != nil && (errors.Is(err, ctxErr) || status.Code(err) == codes.Canceled || status.Code(err) == codes.DeadlineExceeded) {
		return ctxErr
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	return FromStatus(s)
}

// SubmitError is what Submit returns when it gives up: RequestID is the request id every attempt
// carried. An attempt may have created the job although its answer was lost or came too late, so
// a retry of the caller's own with req.RequestId = RequestID returns that job instead of creating
// a second one. Err is the cause (an *Error, or the context's error), reachable with AsError,
// errors.As and errors.Is; Code, status.Code and status.FromError see its code.
type SubmitError struct {
	RequestID string
	Err       error
}

// Error implements error: the cause, then the request id.
func (e *SubmitError) Error() string { return e.Err.Error() + " (request id " + e.RequestID + ")" }

// Unwrap returns the cause.
func (e *SubmitError) Unwrap() error { return e.Err }

// GRPCStatus returns the cause's status (DEADLINE_EXCEEDED or CANCELLED for a context error).
func (e *SubmitError) GRPCStatus() *status.Status {
	if s, ok := status.FromError(e.Err); ok {
		return s
	}
	return status.FromContextError(e.Err)
}

// SubmitRequestID returns the request id of a failed Submit, or "" when err is not one.
func SubmitRequestID(err error) string {
	var e *SubmitError
	if errors.As(err, &e) {
		return e.RequestID
	}
	return ""
}

// AsError returns the *Error inside err, if there is one.
func AsError(err error) (*Error, bool) {
	var e *Error
	if errors.As(err, &e) {
		return e, true
	}
	return nil, false
}

// Code returns err's gRPC code: OK for nil, Unknown for an error that carries none.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if e, ok := AsError(err); ok {
		return e.Code
	}
	return status.Code(err)
}

// Reason returns err's ErrorInfo reason, or "" when it has none.
func Reason(err error) string {
	if e, ok := AsError(err); ok {
		return e.Reason
	}
	return ""
}

// IsNotFound reports whether the job or object does not exist.
func IsNotFound(err error) bool { return Code(err) == codes.NotFound }

// IsInvalidArgument reports whether the request or the dataset it names was rejected.
func IsInvalidArgument(err error) bool { return Code(err) == codes.InvalidArgument }

// IsAlreadyExists reports whether a request id was reused with a different payload.
func IsAlreadyExists(err error) bool { return Code(err) == codes.AlreadyExists }

// IsFailedPrecondition reports whether the job is not in a state that allows the call.
func IsFailedPrecondition(err error) bool { return Code(err) == codes.FailedPrecondition }

// IsResourceExhausted reports whether a server limit was reached; see Error.RetryDelay.
func IsResourceExhausted(err error) bool { return Code(err) == codes.ResourceExhausted }

// IsUnauthenticated reports whether the call carried no valid credentials.
func IsUnauthenticated(err error) bool { return Code(err) == codes.Unauthenticated }

// IsPermissionDenied reports whether the caller may not touch the named path or bucket.
func IsPermissionDenied(err error) bool { return Code(err) == codes.PermissionDenied }

// IsUnavailable reports whether the server or one of its dependencies is unavailable.
func IsUnavailable(err error) bool { return Code(err) == codes.Unavailable }

// IsRetryable reports whether the same call may succeed later: UNAVAILABLE, or
// RESOURCE_EXHAUSTED when the server sent a retry delay (a full queue, not an oversized dataset).
// Submit also repeats an attempt that ran out of its call timeout (DEADLINE_EXCEEDED), which its
// request id makes safe; see Submit.
func IsRetryable(err error) bool {
	switch Code(err) {
	case codes.Unavailable:
		return true
	case codes.ResourceExhausted:
		e, ok := AsError(err)
		return ok && e.RetryDelay > 0
	default:
		return false
	}
}
