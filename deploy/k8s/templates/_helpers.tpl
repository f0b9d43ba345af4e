{{/* Names and labels written once, used by every template. */}}

{{- define "postmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "postmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one service; call with (dict "root" $ "service" "sender"). */}}
{{- define "postmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{- define "postmesh.serviceName" -}}
{{- printf "%s-%s" (include "postmesh.fullname" .root) .service -}}
{{- end -}}

{{- define "postmesh.secretName" -}}
{{- default (printf "%s-secrets" (include "postmesh.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "postmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "postmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "postmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The environment entries of the Secret keys one component gets; call with (dict "root" $ "config" $config).
DATABASE_URL stands for the service's own URL when one is set (or may be, in an existing Secret). */}}
{{- define "postmesh.secretEnv" -}}
{{- $root := .root -}}
{{- $db := include "postmesh.databaseOf" .config.serve -}}
{{- $own := printf "%s_DATABASE_URL" (upper $db) -}}
{{- $existing := $root.Values.secrets.existingSecret -}}
{{- range $key := .config.secretKeys }}
{{- if eq $key "DATABASE_URL" }}
{{- if or $existing (get $root.Values.secrets.databaseUrls $db) }}
- name: {{ $own }}
  valueFrom:
    secretKeyRef:
      name: {{ include "postmesh.secretName" $root }}
      key: {{ $own }}
      {{- if $existing }}
      optional: true
      {{- end }}
{{- end }}
{{- if or $existing $root.Values.secrets.databaseUrl }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "postmesh.secretName" $root }}
      key: DATABASE_URL
      {{- if $existing }}
      optional: true
      {{- end }}
{{- end }}
{{- else }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ include "postmesh.secretName" $root }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The gRPC service name each postmesh service reports on the health check. */}}
{{- define "postmesh.grpcServiceName" -}}
{{- $names := dict "identity" "postmesh.identity.v1.IdentityService" "quota" "postmesh.quota.v1.QuotaService" "sender" "postmesh.sender.v1.SenderService" "feedback" "postmesh.feedback.v1.FeedbackService" "smtp" "postmesh.sender.v1.SmtpSubmission" -}}
{{- get $names . -}}
{{- end -}}

{{/* Where one service reaches another: the headless Service (every replica, round_robin per call) or the
ClusterIP one; call with (dict "root" $ "service" "quota"). */}}
{{- define "postmesh.endpoint" -}}
{{- if .root.Values.headlessServices -}}
{{- printf "dns:///%s-headless:%v" (include "postmesh.serviceName" .) .root.Values.grpcPort -}}
{{- else -}}
{{- printf "%s:%v" (include "postmesh.serviceName" .) .root.Values.grpcPort -}}
{{- end -}}
{{- end -}}

{{/* Kubernetes' gRPC probes speak plain text: under TLS they use the health-only port. */}}
{{- define "postmesh.probePort" -}}
{{- if .Values.tls.enabled -}}{{ .Values.tls.healthPort }}{{- else -}}{{ .Values.grpcPort }}{{- end -}}
{{- end -}}

{{/* The service whose database a servable unit uses: the SMTP server is the sender's accept path. */}}
{{- define "postmesh.databaseOf" -}}
{{- if eq . "smtp" -}}sender{{- else -}}{{ . }}{{- end -}}
{{- end -}}
