{{/* Names, labels and shared fragments of the o2u chart. */}}

{{- define "o2u.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "o2u.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "o2u.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "o2u.selectorLabels" -}}
app.kubernetes.io/name: {{ include "o2u.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "o2u.labels" -}}
helm.sh/chart: {{ include "o2u.chart" . }}
{{ include "o2u.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: o2u
{{- end -}}

{{/* Pods of the server; the Services select these, never the test pod. */}}
{{- define "o2u.serverSelectorLabels" -}}
{{ include "o2u.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "o2u.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "o2u.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "o2u.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "o2u.metricsServiceName" -}}
{{- printf "%s-metrics" (include "o2u.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "true" when the state directory must be a volume: the job store is SQLite, or checkpoints are
local. With PostgreSQL and s3:// checkpoints it is scratch space. */}}
{{- define "o2u.persistentState" -}}
{{- if and .Values.persistence.enabled (or (not (hasPrefix "postgres" .Values.database.url)) (not (hasPrefix "s3://" .Values.checkpoints.uri))) -}}
true
{{- end -}}
{{- end -}}

{{- define "o2u.s3SecretName" -}}
{{- default (printf "%s-s3" (include "o2u.fullname" .)) .Values.s3Credentials.existingSecret -}}
{{- end -}}

{{- define "o2u.s3CredentialsEnabled" -}}
{{- if or .Values.s3Credentials.existingSecret (and .Values.s3Credentials.accessKey .Values.s3Credentials.secretKey) -}}true{{- end -}}
{{- end -}}

{{- define "o2u.authSecretName" -}}
{{- default (printf "%s-auth" (include "o2u.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "o2u.tenantsSecretName" -}}
{{- default (printf "%s-tenants" (include "o2u.fullname" .)) .Values.tenants.existingSecret -}}
{{- end -}}

{{- define "o2u.clientCASecretName" -}}
{{- default .Values.tls.secretName .Values.tls.clientCA.secretName -}}
{{- end -}}

{{/* Selector of this release's series in alert expressions (job is set by the monitors). */}}
{{- define "o2u.alertSelector" -}}
namespace="{{ .Release.Namespace }}", job="{{ include "o2u.fullname" . }}"
{{- end -}}

{{- define "o2u.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "o2u.fullname" .) .Release.Namespace) .Values.tls.serverName -}}
{{- end -}}

{{/*
Arguments of o2u-healthcheck for a given address and timeout (and, optionally, the health service
name to ask for: the whole server when left out), with the TLS options when TLS is on: the server
certificate is verified with tls.caKey against tls.serverName, and under mutual TLS the check
presents the server's own certificate (which the client CA must have signed).
*/}}
{{- define "o2u.healthcheckArgs" -}}
{{- $ := index . 0 -}}
{{- $address := index . 1 -}}
{{- $timeout := index . 2 -}}
{{- $service := "" -}}
{{- if gt (len .) 3 }}{{ $service = index . 3 }}{{ end -}}
- o2u-healthcheck
- --address
- {{ $address | quote }}
- --timeout
- {{ $timeout | quote }}
{{- with $service }}
- --service
- {{ . }}
{{- end }}
{{- if $.Values.tls.enabled }}
- --tls
- --server-name
- {{ include "o2u.tlsServerName" $ }}
{{- with $.Values.tls.caKey }}
- --ca
- /etc/o2u/tls/{{ . }}
{{- end }}
{{- if $.Values.tls.clientCA.enabled }}
- --cert
- /etc/o2u/tls/tls.crt
- --key
- /etc/o2u/tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/*
Startup, liveness and readiness probes against the gRPC health service: native gRPC probes
over plaintext, or o2u-healthcheck run in the container when TLS is on (the kubelet's gRPC
probe cannot do TLS). Readiness asks for the ScoringService (both ways), which turns NOT_SERVING
while the server drains on SIGTERM, so the Service stops sending it calls.
*/}}
{{- define "o2u.probes" -}}
{{- $ := index . 0 -}}
{{- $port := index . 1 -}}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $probe := index $.Values.probes $kind }}
{{ $kind }}Probe:
  {{- if $.Values.tls.enabled }}
  exec:
    command:
      {{- include "o2u.healthcheckArgs" (list $ (printf "127.0.0.1:%d" $port) $probe.timeoutSeconds (ternary "o2u.v1.ScoringService" "" (eq $kind "readiness"))) | nindent 6 }}
  {{- else }}
  grpc:
    port: {{ $port }}
    {{- if eq $kind "readiness" }}
    service: o2u.v1.ScoringService
    {{- end }}
  {{- end }}
  periodSeconds: {{ $probe.periodSeconds }}
  timeoutSeconds: {{ $probe.timeoutSeconds }}
  failureThreshold: {{ $probe.failureThreshold }}
{{- end }}
{{- end -}}
