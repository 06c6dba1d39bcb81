// Package o2u is a thin client for the o2u noise-scoring service (o2u.v1.ScoringService),
// which finds mislabeled training samples with O2U-Net. It wraps the generated stubs in
// o2u.dev/o2u/gen/o2u/v1 with what every caller needs: TLS, mutual TLS and bearer tokens,
// idempotent submission with a request id, retries of the calls that are safe to repeat, a
// watch that reconnects from the last event it saw, keepalive pings that find a connection whose
// peer vanished, iteration over every page of scores, and errors with the server's google.rpc
// details unpacked into *Error.
package o2u

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

// Client calls one o2u server. It is safe for concurrent use.
type Client struct {
	conn     *grpc.ClientConn
	owned    bool
	rpc      o2uv1.ScoringServiceClient
	opts     options
	callOpts []grpc.CallOption
}

// MaxMessageBytes is the largest reply a Dial-ed client accepts (the server's own limit is its
// max_message_bytes setting, 16 MiB by default).
const MaxMessageBytes = 64 << 20

func defaultOptions() options {
	return options{callTimeout: DefaultCallTimeout, retry: DefaultRetryPolicy, keepalive: DefaultKeepalive}
}

// RoundRobin is the default service config of Dial: calls are balanced over every address the
// target resolves to. With "dns:///o2u-headless.<namespace>.svc:50051" (the chart's headless
// Service: one record per ready replica) each call goes to the next replica; gRPC re-resolves
// when one goes away. WithDialOptions(grpc.WithDefaultServiceConfig(...)) overrides it.
const RoundRobin = `{"loadBalancingConfig":[{"round_robin":{}}]}`

// Dial connects to target ("host:port", "dns:///host:port" or any grpc-go target) and returns a
// Client. The connection is made lazily: an unreachable server shows up as an UNAVAILABLE *Error
// on the first call. Without WithTLS (or another TLS option) the connection is plaintext.
func Dial(target string, opts ...Option) (*Client, error) {
	o := defaultOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if o.serverName != "" && !o.tls {
		return nil, fmt.Errorf("o2u: WithServerName(%q) names the server's TLS certificate, but the connection is not TLS: add WithTLS", o.serverName)
	}
	creds, err := o.transportCredentials()
	if err != nil {
		return nil, err
	}
	// A dataset summary of many classes carries K x K numbers (8 MB at the server's default of
	// 1000 classes), past grpc-go's default receive limit of 4 MiB.
	dialOpts := []grpc.DialOption{
		grpc.WithDefaultServiceConfig(RoundRobin),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes)),
	}
	if creds != nil {
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(creds))
	} else {
		dialOpts = append(dialOpts, grpc.WithInsecure())
	}
	if o.token != nil {
		if creds == nil && !o.plaintextToken {
			return nil, errors.New("o2u: a bearer token needs TLS (WithTLS), or WithPlaintextToken on a trusted network")
		}
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearerToken{token: o.token, requireTLS: creds != nil}))
	}
	if o.userAgent != "" {
		dialOpts = append(dialOpts, grpc.WithUserAgent(o.userAgent))
	}
	if o.keepalive.Time > 0 {
		dialOpts = append(dialOpts, grpc.WithKeepaliveParams(o.keepalive))
	}
	dialOpts = append(dialOpts, o.dialOptions...)
	conn, err := grpc.Dial(target, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("o2u: dialing %s: %w", target, err)
	}
	c := newClient(conn, o)
	c.owned = true
	return c, nil
}

// New wraps an existing connection; Close then leaves it open. Credentials and transport
// security are the connection's own; opts may set timeouts and retries.
func New(conn *grpc.ClientConn, opts ...Option) (*Client, error) {
	o := defaultOptions()
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	return newClient(conn, o), nil
}

func newClient(conn *grpc.ClientConn, o options) *Client {
	return &Client{
		conn:     conn,
		rpc:      o2uv1.NewScoringServiceClient(conn),
		opts:     o,
		callOpts: []grpc.CallOption{grpc.ForceCodec(protoCodec{})},
	}
}

// Close closes the connection if Dial opened it.
func (c *Client) Close() error {
	if !c.owned {
		return nil
	}
	return c.conn.Close()
}

// Conn returns the underlying connection (e.g. for the standard health service).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// unary bounds ctx by the call timeout when it has no deadline of its own.
func (c *Client) unary(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || c.opts.callTimeout == 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.opts.callTimeout)
}

// Submit creates a scoring job and returns it once the server has durably queued it. When
// req.RequestId is empty a fresh UUID is used (req itself is not modified). The server
// treats calls with the same request id as one, so within the retry policy Submit retries
// what IsRetryable accepts (UNAVAILABLE, and a full queue that sent a retry delay), and an
// attempt that ran out of its call timeout (DEADLINE_EXCEEDED: the answer may only be late),
// without ever creating a second job. An attempt is bounded by ctx's deadline when it has one,
// else by the call timeout; ctx's deadline bounds the whole call. A failed Submit returns a
// *SubmitError carrying the request id, for a retry of the caller's own.
func (c *Client) Submit(ctx context.Context, req *o2uv1.CreateScoringJobRequest) (*o2uv1.ScoringJob, error) {
	req, ok := proto.Clone(req).(*o2uv1.CreateScoringJobRequest)
	if !ok || req == nil {
		return nil, errors.New("o2u: Submit needs a request")
	}
	if req.RequestId == "" {
		id, err := NewRequestID()
		if err != nil {
			return nil, err
		}
		req.RequestId = id
	}
	retryable := func(err error) bool {
		// wrapError reports ctx's own deadline as context.DeadlineExceeded, so this is the call timeout.
		return IsRetryable(err) || Code(err) == codes.DeadlineExceeded && ctx.Err() == nil
	}
	var job *o2uv1.ScoringJob
	err := c.retry(ctx, retryable, func() error {
		callCtx, cancel := c.unary(ctx)
		defer cancel()
		resp, err := c.rpc.CreateScoringJob(callCtx, req, c.callOpts...)
		if err != nil {
			return wrapError(ctx, err)
		}
		job = resp.GetJob()
		return nil
	})
	if err != nil {
		return nil, &SubmitError{RequestID: req.RequestId, Err: err}
	}
	return job, nil
}

// retry runs call until it succeeds, fails with an error that retryable rejects, or the
// retry policy is spent.
func (c *Client) retry(ctx context.Context, retryable func(error) bool, call func() error) error {
	_, err := c.retryCounted(ctx, retryable, call)
	return err
}

// retryCounted is retry that also says whether call ran more than once.
func (c *Client) retryCounted(ctx context.Context, retryable func(error) bool, call func() error) (retried bool, err error) {
	b := newBackoff(c.opts.retry)
	for {
		err := call()
		if err == nil || !retryable(err) {
			return retried, err
		}
		if !b.wait(ctx, err) {
			if ctx.Err() != nil {
				return retried, ctx.Err()
			}
			return retried, err
		}
		retried = true
	}
}

// unaryRetried runs one call of a method that is safe to repeat, retrying UNAVAILABLE within the
// retry policy, as the Python client does for its reads, cancel and export.
func (c *Client) unaryRetried(ctx context.Context, call func(ctx context.Context) error) (retried bool, err error) {
	return c.retryCounted(ctx, IsUnavailable, func() error {
		callCtx, cancel := c.unary(ctx)
		defer cancel()
		return wrapError(ctx, call(callCtx))
	})
}

// Get returns one job. Like Cancel, Summary, Export, ListJobs and ScoresAll it retries
// UNAVAILABLE within the retry policy; Delete is not retried (a repeat after a lost answer
// would report NOT_FOUND for the job it deleted).
func (c *Client) Get(ctx context.Context, jobID string) (*o2uv1.ScoringJob, error) {
	var resp *o2uv1.GetScoringJobResponse
	_, err := c.unaryRetried(ctx, func(callCtx context.Context) (err error) {
		resp, err = c.rpc.GetScoringJob(callCtx, &o2uv1.GetScoringJobRequest{JobId: jobID}, c.callOpts...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.GetJob(), nil
}

// Cancel stops a queued or running job; cancelling a finished job changes nothing.
func (c *Client) Cancel(ctx context.Context, jobID string) (*o2uv1.ScoringJob, error) {
	var resp *o2uv1.CancelScoringJobResponse
	_, err := c.unaryRetried(ctx, func(callCtx context.Context) (err error) {
		resp, err = c.rpc.CancelScoringJob(callCtx, &o2uv1.CancelScoringJobRequest{JobId: jobID}, c.callOpts...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.GetJob(), nil
}

// Delete removes a finished job with its events and scores.
func (c *Client) Delete(ctx context.Context, jobID string) error {
	callCtx, cancel := c.unary(ctx)
	defer cancel()
	_, err := c.rpc.DeleteScoringJob(callCtx, &o2uv1.DeleteScoringJobRequest{JobId: jobID}, c.callOpts...)
	return wrapError(ctx, err)
}

// Summary returns the dataset-level health report of a finished job.
func (c *Client) Summary(ctx context.Context, jobID string) (*o2uv1.DatasetSummary, error) {
	var resp *o2uv1.GetDatasetSummaryResponse
	_, err := c.unaryRetried(ctx, func(callCtx context.Context) (err error) {
		resp, err = c.rpc.GetDatasetSummary(callCtx, &o2uv1.GetDatasetSummaryRequest{JobId: jobID}, c.callOpts...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.GetSummary(), nil
}

// Export writes a finished job's scores to a new destinationURI (s3:// or file:// under one of
// the server's export locations) as JSONL, CSV or Parquet, or its suspects as Label Studio tasks.
// An export never replaces an object, so a retry after an UNAVAILABLE that cut off the answer
// of an attempt that wrote it fails ALREADY_EXISTS; the error's message then says so.
func (c *Client) Export(ctx context.Context, req *o2uv1.ExportNoiseScoresRequest) (*o2uv1.ExportNoiseScoresResponse, error) {
	var resp *o2uv1.ExportNoiseScoresResponse
	retried, err := c.unaryRetried(ctx, func(callCtx context.Context) (err error) {
		resp, err = c.rpc.ExportNoiseScores(callCtx, req, c.callOpts...)
		return err
	})
	if err != nil {
		if e, ok := AsError(err); ok && retried && e.Code == codes.AlreadyExists {
			e.Message += " (this export was retried after UNAVAILABLE, so an attempt whose response was lost may" +
				" have written it: check the object, or export to a new name)"
		}
		return nil, err
	}
	return resp, nil
}

// ErrStop, returned by a callback of ScoresAll, ListJobs or Watch, ends the iteration
// early without an error.
var ErrStop = errors.New("o2u: stop iteration")

// ListJobs calls fn for every job (newest first), page after page; state UNSPECIFIED lists all.
func (c *Client) ListJobs(ctx context.Context, state o2uv1.JobState, fn func(*o2uv1.ScoringJob) error) error {
	return c.ListJobsMatching(ctx, &o2uv1.ListScoringJobsRequest{State: state}, fn)
}

// ListJobsMatching calls fn for every job matching req's filters (state, and owner: an admin's
// view of one principal's jobs; any other caller lists only its own), newest first, fetching page
// after page. req.PageToken is where iteration starts and req is not modified.
func (c *Client) ListJobsMatching(ctx context.Context, req *o2uv1.ListScoringJobsRequest, fn func(*o2uv1.ScoringJob) error) error {
	req, ok := proto.Clone(req).(*o2uv1.ListScoringJobsRequest)
	if !ok {
		return errors.New("o2u: cannot copy the ListScoringJobsRequest")
	}
	for {
		var resp *o2uv1.ListScoringJobsResponse
		_, err := c.unaryRetried(ctx, func(callCtx context.Context) (err error) {
			resp, err = c.rpc.ListScoringJobs(callCtx, req, c.callOpts...)
			return err
		})
		if err != nil {
			return err
		}
		for _, job := range resp.GetJobs() {
			if err := fn(job); err != nil {
				return stopIsNil(err)
			}
		}
		if resp.GetNextPageToken() == "" {
			return nil
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

// ScoresAll calls fn for every score matching req's filter (top_k, min_score,
// only_suspected), most suspicious first, fetching page after page. req.JobId is required;
// req.PageToken is where iteration starts and req is not modified.
func (c *Client) ScoresAll(ctx context.Context, req *o2uv1.ListNoiseScoresRequest, fn func(*o2uv1.NoiseScore) error) error {
	req, ok := proto.Clone(req).(*o2uv1.ListNoiseScoresRequest)
	if !ok || req == nil {
		return errors.New("o2u: ScoresAll needs a request")
	}
	for {
		var resp *o2uv1.ListNoiseScoresResponse
		_, err := c.unaryRetried(ctx, func(callCtx context.Context) (err error) {
			resp, err = c.rpc.ListNoiseScores(callCtx, req, c.callOpts...)
			return err
		})
		if err != nil {
			return err
		}
		for _, score := range resp.GetNoiseScores() {
			if err := fn(score); err != nil {
				return stopIsNil(err)
			}
		}
		if resp.GetNextPageToken() == "" {
			return nil
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

// Scores collects every score matching req's filter; see ScoresAll.
func (c *Client) Scores(ctx context.Context, req *o2uv1.ListNoiseScoresRequest) ([]*o2uv1.NoiseScore, error) {
	var out []*o2uv1.NoiseScore
	err := c.ScoresAll(ctx, req, func(s *o2uv1.NoiseScore) error {
		out = append(out, s)
		return nil
	})
	return out, err
}

func stopIsNil(err error) error {
	if errors.Is(err, ErrStop) {
		return nil
	}
	return err
}

// Finished reports whether a job state is final (succeeded, failed or cancelled).
func Finished(state o2uv1.JobState) bool {
	switch state {
	case o2uv1.JobState_JOB_STATE_SUCCEEDED, o2uv1.JobState_JOB_STATE_FAILED, o2uv1.JobState_JOB_STATE_CANCELLED:
		return true
	default:
		return false
	}
}

// sleep waits d or until ctx is done; it reports whether the full delay passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
