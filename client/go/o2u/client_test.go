package o2u

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
)

// fakeServer is a scripted ScoringService on loopback, to test the client's retry, reconnect
// and paging logic against a real gRPC transport.
type fakeServer struct {
	o2uv1.UnimplementedScoringServiceServer
	mu            sync.Mutex
	createIDs     []string
	createFails   int
	watchAfter    []int64
	watchScript   func(call int, after int64, send func(seq int64, state o2uv1.JobState) error) error
	scores        []*o2uv1.NoiseScore
	pageTokens    []string
	authorization []string
	jobs          []*o2uv1.ScoringJob
	listed        []string // "owner@page token" of every ListScoringJobs call
	jobState      o2uv1.JobState
	gets          int
	createDelay   time.Duration  // how long the first CreateScoringJob takes (the job is created at once)
	failFirst     map[string]int // method name: how many first calls fail UNAVAILABLE before reaching it
	loseFirst     map[string]int // method name: how many first calls run, then lose their answer
	calls         map[string]int // method name: calls received
	exported      bool
}

// intercept counts calls per method and fails or loses the first ones as failFirst and loseFirst say.
func (f *fakeServer) intercept(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	f.mu.Lock()
	if f.calls == nil {
		f.calls = map[string]int{}
	}
	f.calls[method]++
	n := f.calls[method]
	fail, lose := n <= f.failFirst[method], n <= f.loseFirst[method]
	f.mu.Unlock()
	if fail {
		return nil, status.Error(codes.Unavailable, "restarting")
	}
	resp, err := handler(ctx, req)
	if lose && err == nil {
		return nil, status.Error(codes.Unavailable, "connection reset by peer")
	}
	return resp, err
}

func (f *fakeServer) CancelScoringJob(_ context.Context, req *o2uv1.CancelScoringJobRequest) (*o2uv1.CancelScoringJobResponse, error) {
	return &o2uv1.CancelScoringJobResponse{Job: &o2uv1.ScoringJob{JobId: req.GetJobId(), State: o2uv1.JobState_JOB_STATE_CANCELLED}}, nil
}

func (f *fakeServer) DeleteScoringJob(context.Context, *o2uv1.DeleteScoringJobRequest) (*o2uv1.DeleteScoringJobResponse, error) {
	return &o2uv1.DeleteScoringJobResponse{}, nil
}

func (f *fakeServer) GetDatasetSummary(_ context.Context, req *o2uv1.GetDatasetSummaryRequest) (*o2uv1.GetDatasetSummaryResponse, error) {
	return &o2uv1.GetDatasetSummaryResponse{Summary: &o2uv1.DatasetSummary{JobId: req.GetJobId(), NumSamples: 7}}, nil
}

// ExportNoiseScores never replaces what it wrote, like the real server.
func (f *fakeServer) ExportNoiseScores(_ context.Context, req *o2uv1.ExportNoiseScoresRequest) (*o2uv1.ExportNoiseScoresResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.exported {
		return nil, status.Error(codes.AlreadyExists, "the destination exists")
	}
	f.exported = true
	return &o2uv1.ExportNoiseScoresResponse{DestinationUri: req.GetDestinationUri(), RowsWritten: 7}, nil
}

func (f *fakeServer) GetScoringJob(_ context.Context, req *o2uv1.GetScoringJobRequest) (*o2uv1.GetScoringJobResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gets++
	state := f.jobState
	if state == o2uv1.JobState_JOB_STATE_UNSPECIFIED {
		state = o2uv1.JobState_JOB_STATE_RUNNING
	}
	return &o2uv1.GetScoringJobResponse{Job: &o2uv1.ScoringJob{JobId: req.GetJobId(), State: state}}, nil
}

func (f *fakeServer) CreateScoringJob(ctx context.Context, req *o2uv1.CreateScoringJobRequest) (*o2uv1.CreateScoringJobResponse, error) {
	f.mu.Lock()
	f.createIDs = append(f.createIDs, req.GetRequestId())
	if len(f.createIDs) == 1 && f.createDelay > 0 {
		// Durably created, answered late: the client's attempt times out first.
		f.mu.Unlock()
		time.Sleep(f.createDelay)
		f.mu.Lock()
	}
	defer f.mu.Unlock()
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		f.authorization = append(f.authorization, md.Get("authorization")...)
	}
	if len(f.createIDs) <= f.createFails {
		return nil, status.Error(codes.Unavailable, "draining")
	}
	return &o2uv1.CreateScoringJobResponse{Job: &o2uv1.ScoringJob{JobId: "job-1", RequestId: req.GetRequestId()}}, nil
}

func (f *fakeServer) WatchScoringJob(req *o2uv1.WatchScoringJobRequest, stream o2uv1.ScoringService_WatchScoringJobServer) error {
	f.mu.Lock()
	f.watchAfter = append(f.watchAfter, req.GetAfterSequence())
	call := len(f.watchAfter)
	f.mu.Unlock()
	send := func(seq int64, state o2uv1.JobState) error {
		kind := o2uv1.JobEventType_JOB_EVENT_TYPE_PROGRESS
		if state != o2uv1.JobState_JOB_STATE_RUNNING {
			kind = o2uv1.JobEventType_JOB_EVENT_TYPE_STATE_CHANGED
		}
		return stream.Send(&o2uv1.WatchScoringJobResponse{Event: &o2uv1.JobEvent{Sequence: seq, Type: kind, State: state}})
	}
	return f.watchScript(call, req.GetAfterSequence(), send)
}

func (f *fakeServer) ListScoringJobs(_ context.Context, req *o2uv1.ListScoringJobsRequest) (*o2uv1.ListScoringJobsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listed = append(f.listed, fmt.Sprintf("%s@%s", req.GetOwner(), req.GetPageToken()))
	var jobs []*o2uv1.ScoringJob
	for _, job := range f.jobs {
		if req.GetOwner() == "" || job.GetOwner() == req.GetOwner() {
			jobs = append(jobs, job)
		}
	}
	if req.GetPageToken() == "" && len(jobs) > 1 {
		return &o2uv1.ListScoringJobsResponse{Jobs: jobs[:1], NextPageToken: "second"}, nil
	}
	if req.GetPageToken() != "" {
		jobs = jobs[1:]
	}
	return &o2uv1.ListScoringJobsResponse{Jobs: jobs}, nil
}

func (f *fakeServer) ListNoiseScores(_ context.Context, req *o2uv1.ListNoiseScoresRequest) (*o2uv1.ListNoiseScoresResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pageTokens = append(f.pageTokens, req.GetPageToken())
	start := 0
	if req.GetPageToken() != "" {
		if _, err := fmt.Sscanf(req.GetPageToken(), "p%d", &start); err != nil {
			return nil, status.Error(codes.InvalidArgument, "bad token")
		}
	}
	end := start + int(req.GetPageSize())
	if end > len(f.scores) {
		end = len(f.scores)
	}
	resp := &o2uv1.ListNoiseScoresResponse{NoiseScores: f.scores[start:end], TotalSize: int64(len(f.scores))}
	if end < len(f.scores) {
		resp.NextPageToken = fmt.Sprintf("p%d", end)
	}
	return resp, nil
}

var fastRetries = RetryPolicy{MaxRetries: 3, InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond}

// serveFake starts f on a loopback port and returns its address.
func serveFake(t *testing.T, f *fakeServer, opts ...grpc.ServerOption) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(append([]grpc.ServerOption{grpc.CustomCodec(protoCodec{}), grpc.UnaryInterceptor(f.intercept)}, opts...)...)
	o2uv1.RegisterScoringServiceServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

func dialFake(t *testing.T, target string, opts ...Option) *Client {
	t.Helper()
	client, err := Dial(target, append([]Option{WithRetryPolicy(fastRetries), WithCallTimeout(10 * time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func startFake(t *testing.T, f *fakeServer, opts ...Option) *Client {
	t.Helper()
	return dialFake(t, serveFake(t, f), opts...)
}

func TestSubmitRetriesUnavailableWithTheSameRequestID(t *testing.T) {
	f := &fakeServer{createFails: 2}
	client := startFake(t, f, WithBearerToken("s3cret"), WithPlaintextToken())
	req := &o2uv1.CreateScoringJobRequest{Dataset: &o2uv1.DatasetRef{Uri: "file:///d.npz"}}
	job, err := client.Submit(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.createIDs) != 3 || f.createIDs[0] != f.createIDs[2] || !uuidV4.MatchString(f.createIDs[0]) {
		t.Fatalf("request ids sent: %v", f.createIDs)
	}
	if job.GetRequestId() != f.createIDs[0] || req.GetRequestId() != "" {
		t.Fatal("Submit must send a generated id without modifying the caller's request")
	}
	if len(f.authorization) != 3 || f.authorization[0] != "Bearer s3cret" {
		t.Fatalf("authorization metadata: %v", f.authorization)
	}
}

func TestTokenNeedsTLSUnlessAllowed(t *testing.T) {
	_, err := Dial("127.0.0.1:1", WithBearerToken("t"))
	if err == nil || !strings.Contains(err.Error(), "needs TLS") {
		t.Fatalf("got %v", err)
	}
}

func TestWatchReconnectsFromTheLastSequence(t *testing.T) {
	f := &fakeServer{}
	f.watchScript = func(call int, after int64, send func(int64, o2uv1.JobState) error) error {
		switch call {
		case 1:
			for seq := int64(1); seq <= 3; seq++ {
				if err := send(seq, o2uv1.JobState_JOB_STATE_RUNNING); err != nil {
					return err
				}
			}
			return status.Error(codes.Unavailable, "server restarting")
		case 2:
			return nil // a stream that ends early is resumed too
		default:
			// Replays one event the client already saw; the client must skip it.
			for seq := after; seq <= 5; seq++ {
				state := o2uv1.JobState_JOB_STATE_RUNNING
				if seq == 5 {
					state = o2uv1.JobState_JOB_STATE_SUCCEEDED
				}
				if err := send(seq, state); err != nil {
					return err
				}
			}
			return nil
		}
	}
	client := startFake(t, f)
	var got []int64
	last, err := client.Watch(context.Background(), "job-1", 0, func(e *o2uv1.JobEvent) error {
		got = append(got, e.GetSequence())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[1 2 3 4 5]" || last.GetState() != o2uv1.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("events %v, last %v", got, last)
	}
	if fmt.Sprint(f.watchAfter) != "[0 3 3]" {
		t.Fatalf("after_sequence per stream: %v", f.watchAfter)
	}
}

func TestWatchStopsOnNotFoundAndGivesUpAfterRetries(t *testing.T) {
	f := &fakeServer{}
	f.watchScript = func(int, int64, func(int64, o2uv1.JobState) error) error {
		return status.Error(codes.NotFound, "no job")
	}
	client := startFake(t, f)
	_, err := client.Watch(context.Background(), "job-x", 0, func(*o2uv1.JobEvent) error { return nil })
	if !IsNotFound(err) || len(f.watchAfter) != 1 {
		t.Fatalf("got %v after %d streams", err, len(f.watchAfter))
	}

	f2 := &fakeServer{}
	f2.watchScript = func(int, int64, func(int64, o2uv1.JobState) error) error {
		return status.Error(codes.Unavailable, "down")
	}
	client2 := startFake(t, f2)
	_, err = client2.Watch(context.Background(), "job-1", 7, func(*o2uv1.JobEvent) error { return nil })
	if !errors.Is(err, ErrWatchRetriesExhausted) || !IsUnavailable(err) {
		t.Fatalf("got %v", err)
	}
	if len(f2.watchAfter) != fastRetries.MaxRetries+1 {
		t.Fatalf("streams opened: %d", len(f2.watchAfter))
	}
}

func TestWatchEventsChannelAndErrStop(t *testing.T) {
	f := &fakeServer{}
	f.watchScript = func(_ int, after int64, send func(int64, o2uv1.JobState) error) error {
		for seq := after + 1; seq <= 4; seq++ {
			state := o2uv1.JobState_JOB_STATE_RUNNING
			if seq == 4 {
				state = o2uv1.JobState_JOB_STATE_FAILED
			}
			if err := send(seq, state); err != nil {
				return err
			}
		}
		return nil
	}
	client := startFake(t, f)
	events, result := client.WatchEvents(context.Background(), "job-1", 1)
	var got []int64
	for e := range events {
		got = append(got, e.GetSequence())
	}
	if err := <-result; err != nil || fmt.Sprint(got) != "[2 3 4]" {
		t.Fatalf("events %v, err %v", got, err)
	}
	n := 0
	last, err := client.Watch(context.Background(), "job-1", 0, func(*o2uv1.JobEvent) error {
		n++
		if n == 2 {
			return ErrStop
		}
		return nil
	})
	if err != nil || last.GetSequence() != 2 {
		t.Fatalf("ErrStop: last %v err %v", last, err)
	}
}

func TestScoresAllFollowsEveryPage(t *testing.T) {
	f := &fakeServer{}
	for i := 1; i <= 7; i++ {
		f.scores = append(f.scores, &o2uv1.NoiseScore{SampleId: int64(100 + i), Rank: int64(i)})
	}
	client := startFake(t, f)
	req := &o2uv1.ListNoiseScoresRequest{JobId: "job-1", PageSize: 3}
	scores, err := client.Scores(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	var ranks []int64
	for _, s := range scores {
		ranks = append(ranks, s.GetRank())
	}
	if fmt.Sprint(ranks) != "[1 2 3 4 5 6 7]" || fmt.Sprint(f.pageTokens) != "[ p3 p6]" || req.GetPageToken() != "" {
		t.Fatalf("ranks %v, tokens %q", ranks, f.pageTokens)
	}
}

func TestListJobsMatchingSendsTheOwnerOnEveryPage(t *testing.T) {
	f := &fakeServer{jobs: []*o2uv1.ScoringJob{
		{JobId: "job-3", Owner: "alice"}, {JobId: "job-2", Owner: "bob"}, {JobId: "job-1", Owner: "alice"},
	}}
	client := startFake(t, f)
	req := &o2uv1.ListScoringJobsRequest{Owner: "alice"}
	var ids []string
	err := client.ListJobsMatching(context.Background(), req, func(job *o2uv1.ScoringJob) error {
		ids = append(ids, job.GetJobId())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(ids) != "[job-3 job-1]" || fmt.Sprint(f.listed) != "[alice@ alice@second]" || req.GetPageToken() != "" {
		t.Fatalf("ids %v, calls %q, request token %q", ids, f.listed, req.GetPageToken())
	}
	ids = nil
	if err := client.ListJobs(context.Background(), o2uv1.JobState_JOB_STATE_UNSPECIFIED, func(job *o2uv1.ScoringJob) error {
		ids = append(ids, job.GetJobId())
		return ErrStop
	}); err != nil || fmt.Sprint(ids) != "[job-3]" {
		t.Fatalf("ListJobs with ErrStop: ids %v, err %v", ids, err)
	}
}
