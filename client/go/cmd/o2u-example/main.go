// Command o2u-example submits a dataset to an o2u server, prints a line per training event
// while O2U-Net runs, and then prints the most suspicious samples, most suspicious first.
//
//	o2u-example -target localhost:50051 -uri file:///data/train.npz -top 20
//
// With -job it follows an existing job instead of submitting one (-after SEQUENCE: from after
// that event). Errors are printed with their gRPC code and the server's reason, and the exit
// status is 1 for an error, 3 for a job that failed or was cancelled, and 130 when interrupted
// (the job keeps running). Text the server or a dataset controls (messages, keys, names) is
// printed with control and bidirectional-override characters escaped, as the Python CLI does.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	o2uv1 "o2u.dev/o2u/gen/o2u/v1"
	"o2u.dev/o2u/o2u"
)

type config struct {
	target, uri, format, job, name, requestID, webhook string
	top, pageSize, retries                             int
	after                                              int64
	tls                                                bool
	ca, cert, key, serverName, tokenFile               string
	plaintextToken                                     bool
	timeout                                            time.Duration
	model                                              string
	seed                                               int64
	pretrainEpochs, cycleLength, numCycles             int
	batchSize                                          int
	noiseRate                                          float64
	classAware                                         bool
	maxNoiseRate, minLabelAccuracy                     float64
	set                                                map[string]bool
}

func parseFlags(args []string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("o2u-example", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.target, "target", "localhost:50051", "server address, host:port, or dns:///host:port to balance over every replica")
	fs.StringVar(&c.uri, "uri", "", "dataset URI: s3://bucket/key or file:///path under a server data root")
	fs.StringVar(&c.format, "format", "", "dataset format: npz, image_folder, csv or jsonl (default: from the URI)")
	fs.StringVar(&c.job, "job", "", "follow this existing job instead of submitting one")
	fs.Int64Var(&c.after, "after", 0, "with -job: follow from after this event sequence")
	fs.StringVar(&c.name, "name", "", "display name of the job")
	fs.StringVar(&c.requestID, "request-id", "", "idempotency key (UUID); a fresh one when empty")
	fs.StringVar(&c.webhook, "webhook", "", "https URL on the server's allow-list to notify when the job ends")
	fs.IntVar(&c.top, "top", 10, "number of suspects to print")
	fs.IntVar(&c.pageSize, "page-size", 0, "scores fetched per call (0: server default)")
	fs.BoolVar(&c.tls, "tls", false, "use TLS (system roots unless -ca)")
	fs.StringVar(&c.ca, "ca", "", "PEM CA bundle to verify the server with (implies -tls)")
	fs.StringVar(&c.cert, "cert", "", "PEM client certificate for mutual TLS (implies -tls, needs -key)")
	fs.StringVar(&c.key, "key", "", "PEM private key of -cert")
	fs.StringVar(&c.serverName, "server-name", "", "name to verify the server certificate against")
	fs.StringVar(&c.tokenFile, "token-file", "", "file holding the bearer token")
	fs.BoolVar(&c.plaintextToken, "plaintext-token", false, "allow sending the token without TLS (loopback only)")
	fs.DurationVar(&c.timeout, "timeout", 0, "give up after this long (0: no limit)")
	fs.IntVar(&c.retries, "retries", o2u.DefaultRetryPolicy.MaxRetries, "reconnects after UNAVAILABLE before giving up")
	fs.StringVar(&c.model, "model", "", "model: auto, mlp, small_cnn, cnn9, resnet18, resnet34 or resnet50")
	fs.Int64Var(&c.seed, "seed", 0, "random seed")
	fs.IntVar(&c.pretrainEpochs, "pretrain-epochs", 0, "stage 1 epochs")
	fs.IntVar(&c.cycleLength, "cycle-length", 0, "stage 2 cycle length, in epochs")
	fs.IntVar(&c.numCycles, "num-cycles", 0, "stage 2 learning-rate cycles")
	fs.IntVar(&c.batchSize, "batch-size", 0, "batch size of stages 1 and 2")
	fs.Float64Var(&c.noiseRate, "noise-rate", 0, "known fraction of wrong labels (default: estimated)")
	fs.BoolVar(&c.classAware, "class-aware", false, "normalize losses within each class")
	fs.Float64Var(&c.maxNoiseRate, "max-noise-rate", -1, "gate: exit 20 if the estimated noise rate is above this")
	fs.Float64Var(&c.minLabelAccuracy, "min-label-accuracy", -1, "gate: exit 20 if the estimated label accuracy is below this")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	c.set = map[string]bool{}
	fs.Visit(func(f *flag.Flag) { c.set[f.Name] = true })
	if (c.uri == "") == (c.job == "") {
		return nil, errors.New("give exactly one of -uri (submit a dataset) and -job (follow a job)")
	}
	if c.top < 0 || c.retries < 0 || c.after < 0 {
		return nil, errors.New("-top, -retries and -after must not be negative")
	}
	if c.after > 0 && c.job == "" {
		return nil, errors.New("-after follows an existing job: it needs -job")
	}
	return c, nil
}

func (c *config) dialOptions() []o2u.Option {
	var opts []o2u.Option
	if c.tls || c.ca != "" || c.cert != "" {
		opts = append(opts, o2u.WithTLS(c.ca))
	}
	if c.cert != "" || c.key != "" {
		opts = append(opts, o2u.WithClientCertificate(c.cert, c.key))
	}
	if c.serverName != "" {
		opts = append(opts, o2u.WithServerName(c.serverName))
	}
	if c.tokenFile != "" {
		opts = append(opts, o2u.WithTokenFile(c.tokenFile))
	}
	if c.plaintextToken {
		opts = append(opts, o2u.WithPlaintextToken())
	}
	policy := o2u.DefaultRetryPolicy
	policy.MaxRetries = c.retries
	return append(opts, o2u.WithRetryPolicy(policy), o2u.WithUserAgent("o2u-example"))
}

var formats = map[string]o2uv1.DatasetFormat{
	"":             o2uv1.DatasetFormat_DATASET_FORMAT_UNSPECIFIED,
	"npz":          o2uv1.DatasetFormat_DATASET_FORMAT_NPZ,
	"image_folder": o2uv1.DatasetFormat_DATASET_FORMAT_IMAGE_FOLDER,
	"csv":          o2uv1.DatasetFormat_DATASET_FORMAT_CSV_MANIFEST,
	"jsonl":        o2uv1.DatasetFormat_DATASET_FORMAT_JSONL_MANIFEST,
}

// request builds the job request; only flags given on the command line are sent, so every
// other knob takes the server's data-dependent default.
func (c *config) request() (*o2uv1.CreateScoringJobRequest, error) {
	format, ok := formats[c.format]
	if !ok {
		return nil, fmt.Errorf("unknown -format %q", c.format)
	}
	cfg := &o2uv1.ScoringConfig{Model: c.model}
	if c.set["seed"] {
		cfg.Seed = proto.Int64(c.seed)
	}
	if c.set["pretrain-epochs"] {
		cfg.PretrainEpochs = proto.Int32(int32(c.pretrainEpochs))
	}
	if c.set["cycle-length"] {
		cfg.CycleLengthEpochs = proto.Int32(int32(c.cycleLength))
	}
	if c.set["num-cycles"] {
		cfg.NumCycles = proto.Int32(int32(c.numCycles))
	}
	if c.set["batch-size"] {
		cfg.PretrainBatchSize = proto.Int32(int32(c.batchSize))
		cfg.CyclicBatchSize = proto.Int32(int32(c.batchSize))
	}
	if c.set["noise-rate"] {
		cfg.NoiseRate = proto.Float64(c.noiseRate)
	}
	if c.set["class-aware"] {
		cfg.ClassAwareNormalization = proto.Bool(c.classAware)
	}
	req := &o2uv1.CreateScoringJobRequest{
		Dataset:     &o2uv1.DatasetRef{Uri: c.uri, Format: format},
		Config:      cfg,
		RequestId:   c.requestID,
		DisplayName: c.name,
	}
	if c.webhook != "" {
		req.Webhook = &o2uv1.WebhookTarget{Url: c.webhook}
	}
	return req, nil
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	c, err := parseFlags(args, stderr)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, "o2u-example:", err)
		}
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	client, err := o2u.Dial(c.target, c.dialOptions()...)
	if err != nil {
		return report(stderr, err)
	}
	defer client.Close()

	jobID := c.job
	if jobID == "" {
		req, err := c.request()
		if err != nil {
			return report(stderr, err)
		}
		job, err := client.Submit(ctx, req)
		if err != nil {
			return report(stderr, err)
		}
		jobID = job.GetJobId()
		fmt.Fprintf(stdout, "submitted job %s (request id %s) for %s\n", safeText(jobID), safeText(job.GetRequestId()), safeText(job.GetDataset().GetUri()))
	}
	start := time.Now()
	last, err := client.Watch(ctx, jobID, c.after, func(e *o2uv1.JobEvent) error {
		fmt.Fprintln(stdout, formatEvent(e))
		return nil
	})
	if err != nil {
		if ctx.Err() != nil && c.job == "" {
			fmt.Fprintf(stderr, "stopped watching; job %s keeps running: follow it with -job %s\n", safeText(jobID), safeText(jobID))
		}
		return report(stderr, err)
	}
	state := last.GetState()
	if last == nil || state != o2uv1.JobState_JOB_STATE_SUCCEEDED {
		// No event after -after (the job was already final), or the job did not succeed.
		job, err := client.Get(ctx, jobID)
		if err != nil {
			return report(stderr, err)
		}
		state = job.GetState()
		if state != o2uv1.JobState_JOB_STATE_SUCCEEDED {
			fmt.Fprintf(stdout, "job %s %s: %s [%s]\n", safeText(jobID), stateName(state), safeText(job.GetError().GetMessage()), safeText(job.GetError().GetReason()))
			return 3
		}
	}
	fmt.Fprintf(stdout, "job %s succeeded in %.1fs\n", safeText(jobID), time.Since(start).Seconds())
	if err := printResults(ctx, client, c, jobID, stdout); err != nil {
		return report(stderr, err)
	}
	return gate(ctx, client, c, jobID, stdout, stderr)
}

// gate prints the verdict when -max-noise-rate or -min-label-accuracy is set and returns 20
// (o2u.ExitGateFailed) when the batch fails it.
func gate(ctx context.Context, client *o2u.Client, c *config, jobID string, stdout, stderr io.Writer) int {
	thresholds := o2u.GateThresholds{}
	if c.set["max-noise-rate"] {
		thresholds.MaxNoiseRate = &c.maxNoiseRate
	}
	if c.set["min-label-accuracy"] {
		thresholds.MinLabelAccuracy = &c.minLabelAccuracy
	}
	if thresholds.MaxNoiseRate == nil && thresholds.MinLabelAccuracy == nil {
		return 0
	}
	summary, err := client.Summary(ctx, jobID)
	if err != nil {
		return report(stderr, err)
	}
	verdict, err := o2u.Gate(summary, thresholds)
	if err != nil {
		fmt.Fprintln(stderr, "o2u-example:", err)
		return 2
	}
	fmt.Fprintln(stdout, verdict)
	if !verdict.Passed {
		return o2u.ExitGateFailed
	}
	return 0
}

func printResults(ctx context.Context, client *o2u.Client, c *config, jobID string, stdout io.Writer) error {
	summary, err := client.Summary(ctx, jobID)
	if err != nil {
		return err
	}
	run := summary.GetRunInfo()
	capped := ""
	if summary.GetNoiseRateCapped() {
		capped = " (capped: the share of labels the network confidently disagreed with)"
	}
	fmt.Fprintf(stdout, "%d samples, %d classes, model %s on %s; estimated noise rate %.1f%%%s, %d suspected\n",
		summary.GetNumSamples(), summary.GetNumClasses(), safeText(run.GetModel()), safeText(run.GetDevice()),
		100*summary.GetEstimatedNoiseRate(), capped, summary.GetNumSuspected())
	fmt.Fprintf(stdout, "dataset digest %s\n", safeText(run.GetDatasetDigest()))
	if c.top == 0 {
		return nil
	}
	fmt.Fprintf(stdout, "top %d suspects:\n", c.top)
	w := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "rank\tsample\tkey\tgiven\tsuggested\tconfidence\tscore\tp(noise)\t")
	req := &o2uv1.ListNoiseScoresRequest{JobId: jobID, TopK: int32(c.top), PageSize: int32(c.pageSize)}
	err = client.ScoresAll(ctx, req, func(s *o2uv1.NoiseScore) error {
		fmt.Fprintf(w, "%d\t%d\t%s\t%s\t%s\t%.2f\t%.4f\t%.3f\t\n", s.GetRank(), s.GetSampleId(), safeText(s.GetKey()),
			labelName(s.GetGivenLabel(), s.GetGivenLabelName()), labelName(s.GetSuggestedLabel(), s.GetSuggestedLabelName()),
			s.GetSuggestedLabelConfidence(), s.GetScore(), s.GetNoiseProbability())
		return nil
	})
	if err != nil {
		return err
	}
	return w.Flush()
}

func formatEvent(e *o2uv1.JobEvent) string {
	if e.GetType() == o2uv1.JobEventType_JOB_EVENT_TYPE_PROGRESS {
		p := e.GetProgress()
		line := fmt.Sprintf("progress seq=%d stage=%s", e.GetSequence(), stageName(p.GetStage()))
		if p.GetEpochsTotal() == 0 {
			// Loading and ranking have no epochs, so no loss or throughput either.
			line += fmt.Sprintf(" done=%.1f%%", 100*p.GetFractionDone())
			if p.GetStage() == o2uv1.Stage_STAGE_LOADING {
				line += fmt.Sprintf(" read=%dB files=%d", p.GetBytesRead(), p.GetFilesRead())
			}
			return line
		}
		return line + fmt.Sprintf(" epoch=%d/%d done=%.1f%% loss=%.4f lr=%.5f samples/s=%.0f eta=%.1fs",
			p.GetEpoch(), p.GetEpochsTotal(), 100*p.GetFractionDone(),
			p.GetMeanLoss(), p.GetLearningRate(), p.GetSamplesPerSecond(), p.GetEtaSeconds())
	}
	line := fmt.Sprintf("state seq=%d %s", e.GetSequence(), stateName(e.GetState()))
	if e.GetMessage() != "" {
		line += ": " + safeText(e.GetMessage())
	}
	return line
}

func stateName(s o2uv1.JobState) string {
	return strings.TrimPrefix(s.String(), "JOB_STATE_")
}

func stageName(s o2uv1.Stage) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "STAGE_"))
}

func labelName(label int32, name string) string {
	if name == "" || name == fmt.Sprint(label) {
		return fmt.Sprint(label)
	}
	return fmt.Sprintf("%d:%s", label, safeText(name))
}

// safeText shows each control, line-separator and bidirectional-override character (and each byte
// that is not UTF-8) of text a server, a dataset or another user controls as its escape (\x1b,
// \u202e), as the Python CLI's safe_text does: printed raw, an escape sequence in a sample key
// recolours or retitles the terminal, and an override reorders what the reader sees.
func safeText(text string) string {
	var b strings.Builder
	for i := 0; i < len(text); {
		r, size := utf8.DecodeRuneInString(text[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, text[i])
		case unsafeRune(r):
			b.WriteString(escapeRune(r))
		default:
			b.WriteString(text[i : i+size])
		}
		i += size
	}
	return b.String()
}

func unsafeRune(r rune) bool {
	return r < 0x20 || (r >= 0x7f && r <= 0x9f) || r == 0x061c || r == 0x200e || r == 0x200f ||
		(r >= 0x2028 && r <= 0x202e) || (r >= 0x2066 && r <= 0x2069)
}

func escapeRune(r rune) string {
	switch r {
	case '\t':
		return `\t`
	case '\n':
		return `\n`
	case '\r':
		return `\r`
	}
	if r < 0x100 {
		return fmt.Sprintf(`\x%02x`, r)
	}
	return fmt.Sprintf(`\u%04x`, r)
}

// report prints err with its gRPC code and reason, in a form scripts can grep.
func report(stderr io.Writer, err error) int {
	if e, ok := o2u.AsError(err); ok {
		fmt.Fprintf(stderr, "error: code=%s reason=%s message=%q\n", e.Code, safeText(e.Reason), e.Message)
		for _, v := range e.FieldViolations {
			fmt.Fprintf(stderr, "  field %s: %s\n", safeText(v.Field), safeText(v.Description))
		}
		if e.ResourceType != "" {
			fmt.Fprintf(stderr, "  resource %s %s\n", safeText(e.ResourceType), safeText(e.ResourceName))
		}
		if e.RetryDelay > 0 {
			fmt.Fprintf(stderr, "  retry after %s\n", e.RetryDelay)
		}
	} else {
		fmt.Fprintln(stderr, "error:", safeText(err.Error()))
	}
	// A submission whose answer was lost or late may have created the job: its id finds it.
	if id := o2u.SubmitRequestID(err); id != "" && outcomeUnknown(err) {
		fmt.Fprintf(stderr, "  request id %s: the job may exist; rerun with -request-id %s to get it instead of a second one\n", id, id)
	}
	if errors.Is(err, context.Canceled) {
		return 130
	}
	return 1
}

func outcomeUnknown(err error) bool {
	switch o2u.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		return true
	default:
		return false
	}
}
