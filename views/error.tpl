% rebase('layout', title=f'{status} {description}')
<article class="card">
<p>{{message}}</p>
<p class="muted">Error code {{code}}.</p>
</article>
